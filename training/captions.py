"""Captions as taggers write them: comma-separated tags, shuffled per step with a kept head, tags dropped, prefixed.

kohya's sd-scripts semantics, which most LoRA datasets are captioned for:

* `--shuffle_caption`: the tags (split on ",") are shuffled every time a caption is used;
* `--keep_tokens N`: the first N tags stay first and in order (the trigger word, the class);
  `--keep_tokens_separator SEP`: instead, everything before SEP in a caption stays (its tags stay in order),
  and SEP itself is removed;
* `--caption_tag_dropout_rate P`: each tag outside the kept head is dropped with probability P;
* `--caption_prefix` / `--caption_suffix`: text put before / after every caption, never shuffled or dropped.

With the text-embedding cache the captions of each image are drawn `--caption_variants K` times up front and each
variant is cached (the cache already draws one variant per step), so steps cost no text-encoder call; with
`--no_cache` each step draws a fresh caption. The random draws come from generators seeded per (seed, row,
variant) or per sample, so resuming and process counts do not change them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from latent_diffusion.training.settings import CaptionSettings

TAG_SEPARATOR = ","


def split_tags(text: str) -> list[str]:
    """'a, b ,c' -> ['a', 'b', 'c'] (empty tags dropped)."""
    return [tag.strip() for tag in text.split(TAG_SEPARATOR) if tag.strip()]


def kept_and_free_tags(caption: str, settings: CaptionSettings) -> tuple[list[str], list[str]]:
    """(the kept head, the tags that may be shuffled and dropped) of one caption.

    ValueError when `keep_tokens` asks for more tags than the caption has (the trigger word would not be kept).
    """
    sep = settings.keep_tokens_separator
    if sep and sep in caption:
        head, tail = caption.split(sep, 1)
        return split_tags(head), split_tags(tail.replace(sep, TAG_SEPARATOR))
    tags = split_tags(caption)
    if settings.keep_tokens > len(tags):
        raise ValueError(f"keep_tokens (--keep_tokens) is {settings.keep_tokens} but the caption {caption!r} has "
                         f"only {len(tags)} comma-separated tag(s); lower it or lengthen the caption")
    return tags[:settings.keep_tokens], tags[settings.keep_tokens:]


def check_captions(captions: Sequence[str], settings: CaptionSettings) -> None:
    """Raise the first ValueError `kept_and_free_tags` would raise during training, before training starts."""
    if settings.keep_tokens:
        for caption in captions:
            kept_and_free_tags(caption, settings)


def rewrite_caption(caption: str, settings: CaptionSettings, generator: torch.Generator) -> str:
    """One draw of the caption: kept head, then the other tags dropped (each with P) and shuffled; prefix, suffix.

    An empty caption (caption dropout for classifier-free guidance) stays empty.
    """
    if not caption:
        return caption
    if settings.random or settings.keep_tokens_separator:
        kept, free = kept_and_free_tags(caption, settings)
        if settings.caption_tag_dropout_rate > 0:
            keep = torch.rand(len(free), generator=generator) >= settings.caption_tag_dropout_rate
            free = [tag for tag, kept_tag in zip(free, keep.tolist()) if kept_tag]
        if settings.shuffle_caption:
            free = [free[i] for i in torch.randperm(len(free), generator=generator).tolist()]
        caption = f"{TAG_SEPARATOR} ".join(kept + free)
    parts = [settings.caption_prefix, caption, settings.caption_suffix]
    return " ".join(part.strip() for part in parts if part and part.strip())


def variant_generator(seed: int, row: int, variant: int) -> torch.Generator:
    """The generator of one cached caption variant: a pure function of (seed, row, variant)."""
    return torch.Generator().manual_seed(hash((int(seed), int(row), int(variant), 11)) & 0x7FFF_FFFF_FFFF_FFFF)


def caption_variants_of(captions: Sequence[str], settings: CaptionSettings, seed: int, row: int) -> list[str]:
    """The cached variants of one row: `caption_variants` draws when random (cycling over the row's captions),
    else each caption rewritten once."""
    if not settings.random:
        return [rewrite_caption(c, settings, variant_generator(seed, row, 0)) for c in captions]
    return [rewrite_caption(captions[k % len(captions)], settings, variant_generator(seed, row, k))
            for k in range(settings.caption_variants)]


def expand_caption_column(dataset, caption_column: str, settings: CaptionSettings, seed: int):
    """The dataset with each caption cell replaced by its rewritten variants (a list), for the cache."""
    from latent_diffusion.training.data import caption_variants

    cells = [caption_variants(cell) for cell in dataset[caption_column]]
    check_captions([c for cell in cells for c in cell], settings)
    rewritten = [caption_variants_of(cell, settings, seed, row) for row, cell in enumerate(cells)]
    fingerprint = hash_settings(settings, seed, dataset._fingerprint)  # datasets allows 64 characters
    return dataset.remove_columns(caption_column).add_column(caption_column, rewritten,
                                                             new_fingerprint=fingerprint)


def hash_settings(settings: CaptionSettings, seed: int, fingerprint: str) -> str:
    """A fingerprint of the rewritten dataset: the source dataset's, the caption settings and the seed."""
    import hashlib
    import json
    from dataclasses import asdict

    payload = json.dumps([asdict(settings), seed, fingerprint], sort_keys=True)
    return "captions-" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def caption_rewriter(settings: CaptionSettings) -> Optional["CaptionRewriter"]:
    """The on-the-fly caption transform of a run, or None when captions are used as written."""
    return CaptionRewriter(settings) if settings.changes_captions else None


class CaptionRewriter:
    """`caption_transform` of the on-the-fly datasets: each sample's caption rewritten with the sample's generator."""

    def __init__(self, settings: CaptionSettings):
        self.settings = settings

    def __call__(self, caption: str, generator: torch.Generator) -> str:
        return rewrite_caption(caption, self.settings, generator)


def add_caption_args(g) -> None:
    """The caption flags (kohya's names)."""
    g.add_argument("--shuffle_caption", action="store_true",
                   help="shuffle the comma-separated tags of a caption every time it is used")
    g.add_argument("--keep_tokens", type=int, default=0,
                   help="keep the first N tags first and in order (the trigger word) when shuffling or dropping")
    g.add_argument("--keep_tokens_separator", default=None,
                   help="keep everything before this text in a caption instead (e.g. '|||'); it is removed")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                   help="drop each tag outside the kept ones with this probability")
    g.add_argument("--caption_prefix", default=None, help="text put before every caption (never shuffled)")
    g.add_argument("--caption_suffix", default=None, help="text put after every caption (never shuffled)")
    g.add_argument("--caption_variants", type=int, default=16,
                   help="with the cache and shuffled/dropped tags: caption draws cached per image (each step "
                        "uses one of them); --no_cache draws a fresh one every step")


def check_caption_args(args) -> list[str]:
    """Problems with the caption flags, each naming its flag."""
    problems = []
    if args.keep_tokens < 0:
        problems.append(f"--keep_tokens must be >= 0, got {args.keep_tokens}")
    if not 0.0 <= args.caption_tag_dropout_rate < 1.0:
        problems.append(f"--caption_tag_dropout_rate must be in [0, 1), got {args.caption_tag_dropout_rate}")
    if args.caption_variants < 1:
        problems.append(f"--caption_variants must be >= 1, got {args.caption_variants}")
    if args.keep_tokens_separator is not None and not args.keep_tokens_separator.strip():
        problems.append("--keep_tokens_separator must be visible text, e.g. '|||'")
    return problems
