"""Warnings for requests a model cannot do well: prompt words it does not know, sizes it was not trained at.

"Unknown" words are those the tokenizer can only encode as its unknown token, and, for the embedded Shapes
model (whose every training caption comes from `latent_diffusion.shapes`), any word outside the Shapes
vocabulary, unless a LoRA is active: an adapter can teach the model new words (examples/train_lora.sh teaches
"cobalt"), so then only the tokenizer's verdict counts. The trained size is the UNet's `sample_size` times the VAE factor. Each distinct warning is
logged once per process, as one line.
"""
from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Iterable, Optional, Sequence

logger = logging.getLogger(__name__)
_said: set[str] = set()  # the warnings already given in this process


@lru_cache(maxsize=1)
def shapes_vocabulary() -> frozenset[str]:
    """Every word a Shapes caption can contain (latent_diffusion.shapes: colours, shapes, sizes, places, relations)."""
    from latent_diffusion.shapes import BACKGROUNDS, COLOURS, POSITIONS, RELATIONS, SHAPES, SIZE_CLASSES

    phrases = [*SHAPES, *COLOURS, *BACKGROUNDS, *POSITIONS, *RELATIONS, *SIZE_CLASSES, "a an on background"]
    return frozenset(word for phrase in phrases for word in phrase.split())


def prompt_words(prompts: Iterable[str]) -> list[str]:
    """The distinct lower-case words of the prompts, in order of appearance (punctuation dropped)."""
    words = {}
    for prompt in prompts:
        words.update(dict.fromkeys(re.findall(r"[^\W_]+(?:'[^\W_]+)?", prompt.lower())))
    return list(words)


def unknown_words(prompts: Iterable[str], tokenizer, vocabulary: Optional[frozenset[str]] = None) -> list[str]:
    """Words the tokenizer encodes with its unknown token, or (given a vocabulary) that are not in it."""
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = []
    for word in prompt_words(prompts):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if (vocabulary is not None and word not in vocabulary) or (unk is not None and unk in ids):
            unknown.append(word)
    return unknown


def is_embedded_default(pipe) -> bool:
    """Whether the pipeline was loaded from one of the embedded Shapes models' folders."""
    from latent_diffusion.formats.assets import is_embedded_folder

    name = pipe.config.get("_name_or_path")
    return bool(name) and is_embedded_folder(name)


def has_active_adapters(pipe) -> bool:
    """Whether a LoRA (or other peft adapter) is active on the pipeline."""
    active = getattr(pipe, "get_active_adapters", None)
    return bool(active()) if callable(active) else False


def request_warnings(pipe, prompts: Sequence[str], height: int, width: int) -> list[str]:
    """The one-line warnings for this request: unknown prompt words, a size unlike the trained one."""
    vocabulary = shapes_vocabulary() if is_embedded_default(pipe) and not has_active_adapters(pipe) else None
    lines = []
    unknown = unknown_words(prompts, pipe.tokenizer, vocabulary)
    if unknown:
        source = "the Shapes captions it was trained on" if vocabulary else "its tokenizer"
        lines.append(f"prompt words this model does not know ({source}): {', '.join(unknown)}; expect them to be ignored")
    trained = pipe.resolve_size(None, None)
    if (height, width) != trained:
        lines.append(f"size {height}x{width} differs from the {trained[0]}x{trained[1]} this model was trained at; "
                     "expect repeated or distorted content")
    return lines


def warn_about_request(pipe, prompts: Sequence[str], height: int, width: int) -> None:
    """Log each of `request_warnings` once per process."""
    for line in request_warnings(pipe, prompts, height, width):
        if line not in _said:
            _said.add(line)
            logger.warning(line)
