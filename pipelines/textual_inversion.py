"""Textual-inversion embeddings for `LatentDiffusionPipeline`: diffusers' `TextualInversionLoaderMixin`, safetensors only.

    pipe.load_textual_inversion("easynegative.safetensors")               # token: the file's name, as in A1111
    pipe.load_textual_inversion("style.safetensors", token="<style>")
    pipe("a cat, <style>", negative_prompt="easynegative")

diffusers adds the token(s) to the tokenizer and their vectors to the text encoder's embedding table; a
k-vector embedding becomes k tokens, which `expand_embedding_tokens` writes out in prompts (diffusers'
`maybe_convert_prompt`). What we add: files are read with safetensors only (`.pt`/`.bin` embeddings are
pickles, refused), A1111's `emb_params` files take the file's name as token, and SDXL files (`clip_l` and
`clip_g` vectors) load into both text encoders.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from diffusers.loaders import TextualInversionLoaderMixin

from latent_diffusion.formats.model_files import PICKLE_SUFFIXES

SDXL_KEYS = ("clip_l", "clip_g")  # the two encoders' vectors in an SDXL embedding file


def read_embedding_file(path: Union[str, os.PathLike], argument: str = "embedding") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors embedding; a pickle, a missing or a damaged file is a ValueError naming it."""
    from safetensors.torch import load_file

    from latent_diffusion.formats.model_files import check_safetensors_file

    file = Path(os.fspath(path))
    if file.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{argument} {str(path)!r} is a pickle ({file.suffix}); embeddings are read from .safetensors "
                         "only (most are published as .safetensors too; or convert it once in a trusted environment)")
    if not file.is_file():
        raise ValueError(f"{argument} {str(path)!r} does not exist")
    if file.suffix != ".safetensors":
        raise ValueError(f"{argument} {str(path)!r} must be a .safetensors file")
    check_safetensors_file(file, f"{argument} {str(path)!r}:")
    return load_file(str(file))


def parse_embedding_spec(spec: str) -> tuple[str, Optional[str]]:
    """'PATH[:TOKEN]' -> (path, token or None); a path ending in a weights suffix has no token part."""
    if spec.endswith((".safetensors",) + PICKLE_SUFFIXES) or ":" not in spec:
        return spec, None
    path, token = spec.rsplit(":", 1)
    return path, token or None


class LatentDiffusionTextualInversionMixin(TextualInversionLoaderMixin):
    """diffusers' textual-inversion loader for our pipeline: safetensors files, SD and SDXL."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token: Optional[str] = None,
                               tokenizer=None, text_encoder=None, **kwargs):
        """Load an embedding file (or a state dict, as diffusers takes it) under `token` (default: the file's name)."""
        if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):  # tensors or state dicts: diffusers'
            return super().load_textual_inversion(pretrained_model_name_or_path, token=token, tokenizer=tokenizer,
                                                  text_encoder=text_encoder, **kwargs)
        state = read_embedding_file(pretrained_model_name_or_path)
        token = token or Path(os.fspath(pretrained_model_name_or_path)).stem
        if set(SDXL_KEYS) <= set(state):
            return self._load_sdxl_embedding(state, token, pretrained_model_name_or_path)
        if len(state) != 1:
            raise ValueError(f"embedding {os.fspath(pretrained_model_name_or_path)!r} holds {sorted(state)[:4]}; an SD "
                             "embedding holds one tensor (e.g. emb_params), an SDXL one clip_l and clip_g")
        vectors = next(iter(state.values()))
        return super().load_textual_inversion(vectors, token=token, tokenizer=tokenizer or self.tokenizer,
                                              text_encoder=text_encoder or self.text_encoder)

    def _load_sdxl_embedding(self, state: dict, token: str, path) -> None:
        """clip_l's vectors into the first encoder, clip_g's into the second (the tokenizers get the same tokens)."""
        if getattr(self, "text_encoder_2", None) is None:
            raise ValueError(f"embedding {os.fspath(path)!r} is an SDXL embedding (clip_l, clip_g); this model has one "
                             "text encoder")
        if self.tokenizer_2 is self.tokenizer:  # one object for both would get each token twice
            self.register_modules(tokenizer_2=copy.deepcopy(self.tokenizer))
        super().load_textual_inversion(state["clip_l"], token=token, tokenizer=self.tokenizer,
                                       text_encoder=self.text_encoder)
        super().load_textual_inversion(state["clip_g"], token=token, tokenizer=self.tokenizer_2,
                                       text_encoder=self.text_encoder_2)

    def expand_embedding_tokens(self, prompts: Optional[Sequence[str]]) -> Optional[list[str]]:
        """Prompts with each k-vector embedding token written out as its k tokens (unchanged without embeddings)."""
        return None if prompts is None else list(self.maybe_convert_prompt(list(prompts), self.tokenizer))
