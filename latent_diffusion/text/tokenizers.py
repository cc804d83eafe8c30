"""Text side helpers: train a small CLIP-format BPE tokenizer offline from a caption corpus.

The result is a plain `CLIPTokenizer` folder (vocab.json + merges.txt) that
transformers loads like any Stable Diffusion tokenizer; used by the tests'
tiny components and by the embedded Shapes model.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Iterable

from transformers import CLIPTokenizer

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def train_clip_tokenizer(corpus: Iterable[str], vocab_size: int = 512, model_max_length: int = 77) -> CLIPTokenizer:
    """Train a byte-level-free BPE with CLIP's word-end marker on `corpus` and load it as a CLIPTokenizer.

    Every character of the corpus is in the alphabet; frequent words become single tokens.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=SPECIAL_TOKENS[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator((c.lower() for c in corpus), trainer)
    model = json.loads(tok.to_str())["model"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = os.path.join(tmp, "vocab.json")
        merges_file = os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(_with_bare_characters(model["vocab"]), f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(_merge_lines(model["merges"]))
        return CLIPTokenizer(
            vocab_file, merges_file, model_max_length=model_max_length, pad_token=SPECIAL_TOKENS[1]
        )


def _merge_lines(merges) -> list[str]:
    """merges.txt lines; `tokenizers` stores a merge as a pair or as one "a b" string depending on its version."""
    return [(" ".join(m) if isinstance(m, list) else m) + "\n" for m in merges]


def _with_bare_characters(vocab: dict[str, int]) -> dict[str, int]:
    """CLIP's BPE needs each single character both bare and with '</w>'; add whichever is missing."""
    vocab = dict(vocab)
    for token in list(vocab):
        base = token[: -len("</w>")] if token.endswith("</w>") else token
        if len(base) == 1:
            for form in (base, base + "</w>"):
                vocab.setdefault(form, len(vocab))
    return vocab
