"""How prompts become the UNet's conditioning: one text encoder (SD 1.x / 2.x), or two plus micro-conditioning (SDXL).

The pipeline and the training loop only see a `Conditioning`: the
cross-attention `context` and, for SDXL, what the UNet takes as
`added_cond_kwargs` — the pooled projection of the second text encoder
(`text_embeds`) and the size and crop ids (`time_ids`, Podell et al. 2023,
§2.2). Everything that differs between the two model families lives in the
two conditioners below; `conditioner_for(...)` picks one from the parts a
pipeline holds.

SDXL, as diffusers' `StableDiffusionXLPipeline` does it:
  context     = [penultimate hidden states of encoder 1 ‖ of encoder 2]   (B, L, D₁ + D₂)
  text_embeds = encoder 2's projected pooled output                        (B, P)
  time_ids    = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)  (B, 6)
and, with `force_zeros_for_empty_prompt`, the unconditional branch of a call
without a negative prompt is all zeros (context and pooled), not the encoded "".
(One deliberate difference: diffusers zeros it whenever `negative_prompt` is
None, even when a `negative_prompt_2` is given; here that case is encoded:
"" through the first encoder, `negative_prompt_2` through the second.)
Prompts longer than the tokenizer's window are encoded in chunks, as for SD;
the pooled embedding comes from the first chunk (the tokens diffusers keeps).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from latent_diffusion.text.encoding import check_clip_skip, count_chunks, encode_prompts, tokenize_weighted
from latent_diffusion.text.prompt_syntax import apply_emphasis

Size = tuple[int, int]
TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)
SDXL_ONLY = ("prompts_2", "negatives_2", "original_size", "crops_coords_top_left", "target_size")


@dataclass
class Conditioning:
    """What the UNet is conditioned on, batch-first; `text_embeds`/`time_ids` only for UNets with added embeddings."""

    context: torch.Tensor  # (B, L, D) encoder_hidden_states
    text_embeds: Optional[torch.Tensor] = None  # (B, P) pooled text projection (SDXL)
    time_ids: Optional[torch.Tensor] = None  # (B, 6) micro-conditioning (SDXL)
    control: Optional[torch.Tensor] = None  # (B, 3, H, W) ControlNet control images in [0, 1] (ControlNet training)

    @property
    def dtype(self) -> torch.dtype:
        return self.context.dtype

    def added_cond_kwargs(self) -> Optional[dict[str, torch.Tensor]]:
        """The UNet's `added_cond_kwargs`, or None for a plain cross-attention UNet."""
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}

    def map(self, fn) -> "Conditioning":
        """A copy with `fn` applied to every tensor present."""
        values = (getattr(self, f.name) for f in dataclasses.fields(Conditioning))
        return Conditioning(*(None if t is None else fn(t) for t in values))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "Conditioning":
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each sample n times in a row (num_images_per_prompt)."""
        return self if n == 1 else self.map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch, e.g. [unconditional; conditional] for classifier-free guidance."""
        fields = [f.name for f in dataclasses.fields(Conditioning)]
        values = [[getattr(p, name) for p in parts] for name in fields]
        return Conditioning(*(None if v[0] is None else torch.cat(v) for v in values))


# ----------------------------------------------------------------------------- SD: one text encoder


class SDConditioner:
    """One text encoder's last hidden states as context (SD 1.x / 2.x, T5 models); no added embeddings."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def encode(self, prompts: list[str], negatives: Optional[list[str]] = None, num_images_per_prompt: int = 1,
               clip_skip: Optional[int] = None, prompt_syntax: str = "plain", **sdxl_arguments) -> Conditioning:
        """(B·n, L, D) context, or (2·B·n, L, D) as [unconditional; conditional] when `negatives` are given.

        Both halves use the same number of chunks so they batch together, and the same `clip_skip` (A1111's
        convention; diffusers applies it to the prompt only) and `prompt_syntax` ("a1111" or "plain").
        """
        given = [name for name in SDXL_ONLY if sdxl_arguments.get(name) is not None]
        if given:
            name = {"prompts_2": "prompt_2", "negatives_2": "negative_prompt_2"}.get(given[0], given[0])
            raise ValueError(f"{name} needs an SDXL model (a folder with text_encoder_2 and tokenizer_2); "
                             "this model has one text encoder")
        texts = prompts if negatives is None else negatives + prompts
        chunks = count_chunks(self.tokenizer, texts, prompt_syntax)
        embeds = encode_prompts(self.tokenizer, self.text_encoder, texts, chunks,
                                check_clip_skip(self.text_encoder, clip_skip), prompt_syntax)  # (B or 2B, L, D)
        return Conditioning(embeds).repeat_interleave(num_images_per_prompt)


# ----------------------------------------------------------------------------- SDXL: two text encoders + size ids


def encode_penultimate(text_encoder, token_ids: torch.Tensor, clip_skip: Optional[int] = None,
                       weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B, K, L) ids -> ((B, K·L, D) penultimate hidden states, (B, P) pooled projection of chunk 0 or None).

    SDXL conditions on the layer before the last (diffusers' `hidden_states[-2]`), and `clip_skip` k layers
    further back (`hidden_states[-(k + 2)]`, as diffusers); only an encoder with a projection head
    (`CLIPTextModelWithProjection`, whose first output is 2-D) gives a pooled embedding. `weights` (B, K, L):
    A1111's emphasis on the hidden states (the pooled embedding stays unweighted, as in A1111).
    """
    batch, chunks, length = token_ids.shape
    flat = token_ids.reshape(batch * chunks, length).to(text_encoder.device)
    out = text_encoder(flat, output_hidden_states=True)
    hidden = out.hidden_states[-(2 + (clip_skip or 0))]  # (B·K, L, D)
    pooled = out[0].reshape(batch, chunks, -1)[:, 0] if out[0].ndim == 2 else None  # (B, P)
    hidden = hidden.reshape(batch, chunks * length, hidden.shape[-1])
    return hidden if weights is None else apply_emphasis(hidden, weights), pooled


def make_time_ids(original_size: Size, crops_coords_top_left: Size, target_size: Size) -> torch.Tensor:
    """(6,) SDXL micro-conditioning: original (h, w), crop top-left (top, left), target (h, w)."""
    values = [*original_size, *crops_coords_top_left, *target_size]
    if len(values) != TIME_IDS:
        raise ValueError("original_size, crops_coords_top_left and target_size must each be a pair of integers, "
                         f"got {original_size!r}, {crops_coords_top_left!r}, {target_size!r}")
    return torch.tensor(values, dtype=torch.float32)


def check_added_embedding(unet, projection_dim: int) -> None:
    """The UNet's added embedding must take 6 size ids and the pooled projection (a clear error if not)."""
    time_dim = unet.config.addition_time_embed_dim
    expected = unet.config.projection_class_embeddings_input_dim
    if time_dim is None or expected != TIME_IDS * time_dim + projection_dim:
        raise ValueError(
            f"unet: its added embedding takes {expected} inputs, but {TIME_IDS} time ids × addition_time_embed_dim "
            f"{time_dim} + text_encoder_2's projection_dim {projection_dim} give a different number"
        )


class SDXLConditioner:
    """Two CLIP encoders (the second with projection) and the size/crop ids, as in StableDiffusionXLPipeline.

    `text_encoder` / `tokenizer` may be None (refiner-style folders with only the second encoder).
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, force_zeros_for_empty_prompt: bool = True):
        pairs = [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)]
        self.encoders = [(tok, enc) for tok, enc in pairs if enc is not None]
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    def encode_texts(self, texts: list[str], texts_2: Optional[list[str]] = None,
                     num_chunks: Optional[int] = None, clip_skip: Optional[int] = None,
                     prompt_syntax: str = "plain") -> Conditioning:
        """Context (N, K·L, D₁+D₂) and pooled (N, P) of `texts` (encoder 1) and `texts_2` (encoder 2; default `texts`).

        Both encoders use the same number of chunks (the larger need of the two) so their states concatenate.
        """
        per_encoder = [texts, texts if texts_2 is None else texts_2][-len(self.encoders):]
        chunks = num_chunks or max(count_chunks(tok, t, prompt_syntax)
                                   for (tok, _), t in zip(self.encoders, per_encoder))
        hiddens, pooled = [], None
        for (tokenizer, encoder), encoder_texts in zip(self.encoders, per_encoder):
            skip = check_clip_skip(encoder, clip_skip, base_skip=1)  # below the penultimate layer
            ids, weights = tokenize_weighted(tokenizer, encoder_texts, chunks, prompt_syntax)
            hidden, pooled_here = encode_penultimate(encoder, ids, skip, weights)
            hiddens.append(hidden)
            pooled = pooled_here if pooled_here is not None else pooled  # the last encoder with a projection
        if pooled is None:
            raise ValueError("text_encoder_2 must have a projection head (CLIPTextModelWithProjection) for SDXL")
        return Conditioning(torch.cat(hiddens, dim=-1), pooled)

    def encode(
        self,
        prompts: list[str],
        negatives: Optional[list[str]] = None,
        num_images_per_prompt: int = 1,
        *,
        prompts_2: Optional[list[str]] = None,
        negatives_2: Optional[list[str]] = None,
        negative_prompt_given: bool = True,
        size: Optional[Size] = None,
        original_size: Optional[Size] = None,
        crops_coords_top_left: Optional[Size] = None,
        target_size: Optional[Size] = None,
        clip_skip: Optional[int] = None,
        prompt_syntax: str = "plain",
    ) -> Conditioning:
        """(B·n, ...) conditioning, or (2·B·n, ...) as [unconditional; conditional] when `negatives` are given.

        `size` is the generated (height, width): `original_size` and `target_size` default to it and
        `crops_coords_top_left` to (0, 0), as in diffusers. Without a negative prompt
        (`negative_prompt_given` False) a force-zeros model gets a zero unconditional branch. `clip_skip`
        and `prompt_syntax` apply to both halves and both encoders.
        """
        text = dict(clip_skip=clip_skip, prompt_syntax=prompt_syntax)
        if negatives is None:
            cond = self.encode_texts(prompts, prompts_2, **text)
        elif self.force_zeros_for_empty_prompt and not negative_prompt_given:
            positive = self.encode_texts(prompts, prompts_2, **text)
            cond = Conditioning.cat([positive.map(torch.zeros_like), positive])
        else:
            both_2 = None  # the second encoder reads the first one's prompts
            if prompts_2 is not None or negatives_2 is not None:
                both_2 = (negatives_2 or negatives) + (prompts_2 or prompts)
            # one batch: both halves get the same chunk count
            cond = self.encode_texts(negatives + prompts, both_2, **text)
        if size is None and (original_size is None or target_size is None):
            raise ValueError("size: the generated (height, width) is needed for the SDXL size ids")
        ids = make_time_ids(original_size or size, crops_coords_top_left or (0, 0), target_size or size)
        cond.time_ids = ids.to(cond.context.device, cond.dtype).repeat(cond.context.shape[0], 1)  # (N, 6)
        return cond.repeat_interleave(num_images_per_prompt)


Conditioner = Union[SDConditioner, SDXLConditioner]


def is_sdxl_unet(unet) -> bool:
    """Whether a UNet takes SDXL's added embedding (pooled text + time ids)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def conditioner_for(tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None,
                    force_zeros_for_empty_prompt: Optional[bool] = None, unet=None) -> Conditioner:
    """The SDXL conditioner when a second text encoder is present, else the single-encoder one.

    Given the `unet`, checks that it takes what the conditioner gives (an SDXL UNet needs both encoders).
    """
    if text_encoder_2 is None:
        if unet is not None and is_sdxl_unet(unet):
            raise ValueError("unet takes SDXL's added embeddings (addition_embed_type 'text_time'), which need "
                             "text_encoder_2 and tokenizer_2; this model has no text_encoder_2")
        return SDConditioner(tokenizer, text_encoder)
    if tokenizer_2 is None:
        raise ValueError("tokenizer_2 is missing: an SDXL model needs one tokenizer per text encoder")
    if unet is not None:
        check_added_embedding(unet, text_encoder_2.config.projection_dim)
    force = True if force_zeros_for_empty_prompt is None else force_zeros_for_empty_prompt  # diffusers' default
    return SDXLConditioner(tokenizer, text_encoder, tokenizer_2, text_encoder_2, force)
