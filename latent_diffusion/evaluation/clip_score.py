"""CLIP score (Hessel et al. 2021) with any transformers CLIP model, and CLIP image embeddings for FD-CLIP.

For an image I and its prompt C, with E_I and E_C the projected CLIP embeddings:

    CLIP-S(I, C) = 100 · max(cos(E_I, E_C), 0)        (the mean over pairs is reported)

w = 100 is torchmetrics' scale (Hessel et al. use w = 2.5). We clamp each pair
before averaging, as the formula reads; torchmetrics clamps the mean instead.
The two agree whenever every cosine is positive, which is the case for trained
CLIP models on natural image/caption pairs.

Images are preprocessed by the model folder's own image processor (resize,
center crop, normalize), from RGB uint8, as for any CLIP user. Prompts longer
than the text encoder's context are truncated with a warning.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.evaluation.images import iter_batches, to_pil

DEFAULT_BATCH_SIZE = 32


def load_clip_model(model_path: str | os.PathLike, require_text: bool = False) -> nn.Module:
    """A transformers CLIPModel, CLIPVisionModelWithProjection or CLIPVisionModel from `model_path`, in eval mode.

    `require_text=True` (CLIP score) accepts only a full CLIPModel (image and text towers).
    """
    from transformers import AutoConfig, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(model_path)
    if config.model_type == "clip":
        return CLIPModel.from_pretrained(model_path).eval()
    if config.model_type == "clip_vision_model" and not require_text:
        with_projection = "CLIPVisionModelWithProjection" in (config.architectures or [])
        model_class = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
        return model_class.from_pretrained(model_path).eval()
    expected = "'clip'" if require_text else "'clip' or 'clip_vision_model'"
    raise ValueError(
        f"model_path {str(model_path)!r} holds a {config.model_type!r} model; expected model_type {expected}"
    )


def load_image_processor(model_path: str | os.PathLike, image_size: int):
    """The folder's image processor; without one, CLIP's standard preprocessing at the model's `image_size`."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_path)
    except (OSError, ValueError):
        return _default_clip_image_processor(image_size)


def _default_clip_image_processor(image_size: int):
    """Shortest edge → image_size (bicubic), center crop image_size², OpenAI CLIP mean/std."""
    import transformers

    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor_class(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings E_I (B, D); the pooled output where the model has no projection."""
    if hasattr(model, "visual_projection"):  # CLIPModel
        pooled = model.vision_model(pixel_values=pixel_values).pooler_output  # (B, hidden)
        return model.visual_projection(pooled)  # (B, D)
    outputs = model(pixel_values=pixel_values)
    embeds = getattr(outputs, "image_embeds", None)  # CLIPVisionModelWithProjection
    return embeds if embeds is not None else outputs.pooler_output


def text_embeddings(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected text embeddings E_C (B, D) of a CLIPModel."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (B, hidden)
    return model.text_projection(pooled)  # (B, D)


def clip_score_per_pair(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP-S = 100 · max(cos(E_I, E_C), 0) for each row pair; (B, D), (B, D) → (B,)."""
    cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)  # (B,)
    return 100.0 * cosine.clamp(min=0.0)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class CLIPImageEmbedder(nn.Module):
    """Images in [0, 1] (B, 3, H, W) → CLIP image embeddings (B, D); the feature space of FD-CLIP."""

    measure_name = "FD-CLIP"

    def __init__(self, model_path: str | os.PathLike, device: str | torch.device | None = None,
                 require_text: bool = False):
        super().__init__()
        self.model_path = str(model_path)
        self.model = load_clip_model(model_path, require_text=require_text).to(device or _default_device())
        vision_config = getattr(self.model.config, "vision_config", self.model.config)
        self.processor = load_image_processor(model_path, vision_config.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def pixel_values(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The processor's resize, crop and normalization, from RGB uint8 as CLIP saw in training.

        `images`: (B, 3, H, W) or a list of (3, H, W), float in [0, 1]; sizes may differ in a list.
        """
        inputs = self.processor(images=[to_pil(image) for image in images], return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return inputs["pixel_values"].to(self.device, dtype)  # (B, 3, S, S)

    @torch.no_grad()
    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        return image_embeddings(self.model, self.pixel_values(images))


class CLIPScorer:
    """Keeps a CLIP model loaded for repeated CLIP-score calls; `scorer(images, prompts)` → mean CLIP-S."""

    def __init__(self, model_path: str | os.PathLike, device: str | torch.device | None = None):
        from transformers import AutoTokenizer

        self.embedder = CLIPImageEmbedder(model_path, device=device, require_text=True)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as error:
            raise ValueError(f"model_path {str(model_path)!r} has no tokenizer files; CLIP score needs one") from error
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @property
    def model(self) -> nn.Module:
        return self.embedder.model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded, truncated token ids and attention mask (B, L); warns when a prompt is cut."""
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        if max(lengths) > self.max_length:
            warnings.warn(
                f"{sum(n > self.max_length for n in lengths)} prompt(s) exceed the CLIP text encoder's "
                f"{self.max_length} tokens and were truncated for the CLIP score",
                stacklevel=3,
            )
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return tokens["input_ids"].to(self.embedder.device), tokens["attention_mask"].to(self.embedder.device)

    @torch.no_grad()
    def scores(self, images, prompts, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """CLIP-S of each (image, prompt) pair, in order; (N,) float64."""
        prompts = _as_prompt_list(prompts)
        results, done = [], 0
        for batch in iter_batches(images, batch_size):
            batch_prompts = prompts[done : done + len(batch)]
            if len(batch_prompts) < len(batch):
                raise ValueError(f"got more images than prompts ({len(prompts)}); pass one prompt per image")
            image_embeds = self.embedder(batch)  # (B, D)
            text_embeds = text_embeddings(self.model, *self.tokenize(batch_prompts))  # (B, D)
            results.append(clip_score_per_pair(image_embeds, text_embeds).cpu().double().numpy())
            done += len(batch)
        if done != len(prompts):
            raise ValueError(f"got {done} images and {len(prompts)} prompts; pass one prompt per image")
        return np.concatenate(results)

    def __call__(self, images, prompts, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
        """Mean CLIP-S over all pairs."""
        return float(self.scores(images, prompts, batch_size=batch_size).mean())


def clip_score(images, prompts, model_path: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE,
               device: str | torch.device | None = None) -> float:
    """Mean CLIP-S = 100 · max(cos(E_I, E_C), 0) over (image, prompt) pairs, with the CLIP model at `model_path`."""
    return CLIPScorer(model_path, device=device)(images, prompts, batch_size=batch_size)


def _as_prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty string or list of strings")
    return prompts

