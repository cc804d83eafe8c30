"""Tokenizing and text encoding: prompt strings to the text encoder's hidden states.

Prompts longer than the tokenizer's window are encoded in chunks of that
window (each wrapped in its own start/end tokens) and concatenated along the
sequence, as long-prompt users of Stable Diffusion expect; tokenizers with no
start token (T5) are truncated with a warning instead.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from latent_diffusion.text.prompt_syntax import Chunk, apply_emphasis, check_prompt_syntax, plain_text, weighted_chunks


def _window(tokenizer) -> int:
    """Tokens per chunk, start and end tokens included (77 for CLIP)."""
    return int(min(tokenizer.model_max_length, 4096))


def _body_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt without special tokens."""
    return tokenizer(list(prompts), add_special_tokens=False, truncation=False, verbose=False).input_ids


def _chunk_bodies(tokenizer, prompts: Sequence[str], prompt_syntax: str) -> list[list[Chunk]]:
    """Each prompt's chunk bodies (no start/end tokens) with token weights: every `window − 2` tokens
    ("plain"), or A1111's weighted chunks ("a1111", latent_diffusion.text.prompt_syntax)."""
    per_chunk = _window(tokenizer) - 2
    if check_prompt_syntax(prompt_syntax) == "a1111":
        return [weighted_chunks(tokenizer, prompt, per_chunk) for prompt in prompts]
    starts = lambda ids: range(0, max(len(ids), 1), per_chunk)  # noqa: E731  (an empty prompt: one empty chunk)
    return [[(ids[k : k + per_chunk], [1.0] * len(ids[k : k + per_chunk])) for k in starts(ids)]
            for ids in _body_ids(tokenizer, prompts)]


def count_chunks(tokenizer, prompts: Sequence[str], prompt_syntax: str = "plain") -> int:
    """How many windows the longest prompt needs (at least one)."""
    if tokenizer.bos_token_id is None:
        return 1
    return max(len(chunks) for chunks in _chunk_bodies(tokenizer, prompts, prompt_syntax))


def tokenize_prompts(tokenizer, prompts: Sequence[str], num_chunks: Optional[int] = None) -> torch.Tensor:
    """(B, num_chunks, window) token ids, each chunk `<start> … <end> <pad>…`; T5-style tokenizers give (B, 1, window)."""
    return tokenize_weighted(tokenizer, prompts, num_chunks)[0]


def tokenize_weighted(tokenizer, prompts: Sequence[str], num_chunks: Optional[int] = None,
                      prompt_syntax: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, window) token ids as `tokenize_prompts` and (B, K, window) token weights (1 for start, end,
    padding, and for every token of a "plain" prompt). T5-style tokenizers read A1111 prompts without
    their syntax (`plain_text`), unweighted."""
    window = _window(tokenizer)
    if tokenizer.bos_token_id is None:
        texts = [plain_text(p) for p in prompts] if check_prompt_syntax(prompt_syntax) == "a1111" else prompts
        ids = _tokenize_truncating(tokenizer, texts, window)
        return ids, torch.ones(ids.shape)
    bodies = _chunk_bodies(tokenizer, prompts, prompt_syntax)
    num_chunks = num_chunks or max(len(chunks) for chunks in bodies)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, weights = [], []
    for chunks in bodies:
        if len(chunks) > num_chunks:
            warnings.warn(f"prompt of {len(chunks)} chunks truncated to {num_chunks} "
                          f"({num_chunks * (window - 2)} tokens)", stacklevel=3)
        chunks = chunks[:num_chunks] + [([], [])] * (num_chunks - len(chunks))
        ids.append([[tokenizer.bos_token_id, *body, tokenizer.eos_token_id] + [pad] * (window - 2 - len(body))
                    for body, _ in chunks])
        weights.append([[1.0, *w, 1.0] + [1.0] * (window - 2 - len(w)) for _, w in chunks])
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def _tokenize_truncating(tokenizer, prompts: Sequence[str], window: int) -> torch.Tensor:
    full = _body_ids(tokenizer, prompts)
    if any(len(ids) + 1 > window for ids in full):
        warnings.warn(f"prompt longer than the tokenizer's {window} tokens was truncated", stacklevel=3)
    ids = tokenizer(list(prompts), padding="max_length", max_length=window, truncation=True, return_tensors="pt")
    return ids.input_ids[:, None, :]


def encode_tokens(text_encoder, token_ids: torch.Tensor, clip_skip: Optional[int] = None,
                  weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, K, L) ids -> (B, K·L, D) last hidden states; all chunks go through the encoder as one batch.

    `clip_skip` k ≥ 1 takes the hidden states k layers before the last, through the encoder's final layer
    norm (A1111's "Clip skip: k + 1", diffusers' `clip_skip=k`). `weights` (B, K, L): A1111's emphasis
    (`prompt_syntax.apply_emphasis`) on the result.
    """
    batch, chunks, length = token_ids.shape
    flat = token_ids.reshape(batch * chunks, length).to(text_encoder.device)
    if clip_skip:
        hidden = text_encoder(flat, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        hidden = final_layer_norm(text_encoder)(hidden)  # (B·K, L, D)
    else:
        hidden = text_encoder(flat)[0]  # (B·K, L, D)
    hidden = hidden.reshape(batch, chunks * length, hidden.shape[-1])
    return hidden if weights is None else apply_emphasis(hidden, weights)


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], num_chunks: Optional[int] = None,
                   clip_skip: Optional[int] = None, prompt_syntax: str = "plain") -> torch.Tensor:
    """Prompts -> (B, K·L, D) conditioning for the UNet's cross-attention (`clip_skip`: see encode_tokens;
    `prompt_syntax` "a1111": weights and BREAK as A1111 reads them, "plain": the text as it is)."""
    ids, weights = tokenize_weighted(tokenizer, prompts, num_chunks, prompt_syntax)
    return encode_tokens(text_encoder, ids, clip_skip, weights)


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


