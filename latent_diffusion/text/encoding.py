"""Tokenizing and text encoding: prompt strings to the text encoder's hidden states.

Prompts longer than the tokenizer's window are encoded in chunks of that
window (each wrapped in its own start/end tokens) and concatenated along the
sequence, as long-prompt users of Stable Diffusion expect; tokenizers with no
start token (T5) are truncated with a warning instead.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch


def _window(tokenizer) -> int:
    """Tokens per chunk, start and end tokens included (77 for CLIP)."""
    return int(min(tokenizer.model_max_length, 4096))


def _body_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt without special tokens."""
    return tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False).input_ids


def count_chunks(tokenizer, prompts: Sequence[str]) -> int:
    """How many windows the longest prompt needs (at least one)."""
    if tokenizer.bos_token_id is None:
        return 1
    per_chunk = _window(tokenizer) - 2
    return max(1, *(math.ceil(len(ids) / per_chunk) for ids in _body_ids(tokenizer, prompts)))


def tokenize_prompts(tokenizer, prompts: Sequence[str], num_chunks: Optional[int] = None) -> torch.Tensor:
    """(B, num_chunks, window) token ids, each chunk `<start> … <end> <pad>…`; T5-style tokenizers give (B, 1, window)."""
    window = _window(tokenizer)
    if tokenizer.bos_token_id is None:
        return _tokenize_truncating(tokenizer, prompts, window)
    num_chunks = num_chunks or count_chunks(tokenizer, prompts)
    per_chunk = window - 2
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for ids in _body_ids(tokenizer, prompts):
        if len(ids) > per_chunk * num_chunks:
            warnings.warn(f"prompt of {len(ids)} tokens truncated to {per_chunk * num_chunks}", stacklevel=3)
        chunks = []
        for k in range(num_chunks):
            body = ids[k * per_chunk : (k + 1) * per_chunk]
            chunk = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
            chunks.append(chunk + [pad] * (window - len(chunk)))
        rows.append(chunks)
    return torch.tensor(rows, dtype=torch.long)


def _tokenize_truncating(tokenizer, prompts: Sequence[str], window: int) -> torch.Tensor:
    full = _body_ids(tokenizer, prompts)
    if any(len(ids) + 1 > window for ids in full):
        warnings.warn(f"prompt longer than the tokenizer's {window} tokens was truncated", stacklevel=3)
    ids = tokenizer(list(prompts), padding="max_length", max_length=window, truncation=True, return_tensors="pt")
    return ids.input_ids[:, None, :]


def encode_tokens(text_encoder, token_ids: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
    """(B, K, L) ids -> (B, K·L, D) last hidden states; all chunks go through the encoder as one batch.

    `clip_skip` k ≥ 1 takes the hidden states k layers before the last, through the encoder's final layer
    norm (A1111's "Clip skip: k + 1", diffusers' `clip_skip=k`).
    """
    batch, chunks, length = token_ids.shape
    flat = token_ids.reshape(batch * chunks, length).to(text_encoder.device)
    if clip_skip:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        hidden = final_layer_norm(text_encoder)(hidden)  # (B·K, L, D)
    else:
        hidden = text_encoder(flat)[0]  # (B·K, L, D)
    return hidden.reshape(batch, chunks * length, hidden.shape[-1])


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], num_chunks: Optional[int] = None,
                   clip_skip: Optional[int] = None) -> torch.Tensor:
    """Prompts -> (B, K·L, D) conditioning for the UNet's cross-attention (`clip_skip`: see encode_tokens)."""
    return encode_tokens(text_encoder, tokenize_prompts(tokenizer, prompts, num_chunks), clip_skip)


def final_layer_norm(text_encoder) -> Optional[torch.nn.Module]:
    """A CLIP text encoder's final LayerNorm (on the model in transformers 5, on `.text_model` before), else None."""
    return getattr(getattr(text_encoder, "text_model", text_encoder), "final_layer_norm", None)


def check_clip_skip(text_encoder, clip_skip: Optional[int], base_skip: int = 0) -> Optional[int]:
    """None, or a layer count to skip that this CLIP text encoder has; ValueError naming it.

    `base_skip`: layers the model skips anyway (SDXL conditions on the penultimate layer: 1). At most
    layers − base_skip can go: the furthest back is the token embeddings' output, as in diffusers.
    """
    if clip_skip is None:
        return None
    layers = getattr(text_encoder.config, "num_hidden_layers", None)
    if final_layer_norm(text_encoder) is None or layers is None:
        raise ValueError(f"clip_skip needs a CLIP text encoder; this model's is {type(text_encoder).__name__}")
    most = layers - base_skip
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= most:
        raise ValueError(f"clip_skip must be an integer from 1 to {most} (this text encoder has {layers} layers), "
                         f"got {clip_skip!r}")
    return clip_skip


