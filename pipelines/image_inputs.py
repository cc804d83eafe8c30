"""The pipeline's image inputs: `image=` (img2img, SDEdit) and `mask_image=` (inpainting), checked and prepared.

Images and masks go through diffusers' `VaeImageProcessor` with the settings
of diffusers' img2img / inpaint pipelines (resize to the output size with
Lanczos, map images to [-1, 1], binarise masks at ½), so the same inputs give
the same tensors. The generator is drawn from in diffusers' order: the image's
posterior sample, then the initial noise, then (inpainting UNet) the masked
image's posterior sample; the same seed therefore gives diffusers' image.

Batches: `image` / `mask_image` hold one entry or one per prompt; each is used
for all `num_images_per_prompt` images of its prompt. (diffusers tiles a
per-prompt list instead, which pairs images with the wrong prompts when
`num_images_per_prompt` > 1.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from latent_diffusion.vae import encode_images, latent_size_multiple, vae_scale_factor
from latent_diffusion.diffusion.inpainting import KnownRegionBlend, chain_callbacks, latent_mask, masked_pixels
from latent_diffusion.diffusion.sdedit import default_strength, strength_timesteps
from latent_diffusion.tensors import randn

IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor)
ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, Sequence[Any]]


@dataclass
class ImageEdit:
    """How an img2img / inpainting run starts and what it adds to every step.

    `timesteps`: the tail of the sampler's plan that runs; `x`: x at its first timestep (B, C, h, w);
    `unet_extra`: [mask, masked-image latents] appended to the UNet input (inpainting UNet), (B or 2B, 1 + C, h, w);
    `blend`: the known-region step callback (ordinary UNet with a mask).
    """

    timesteps: torch.Tensor
    x: torch.Tensor
    unet_extra: Optional[torch.Tensor] = None
    blend: Optional[KnownRegionBlend] = None

    def step_callback(self, callback):
        """The pipeline's per-step callback, run after the blend when there is one (diffusers' order)."""
        return callback if self.blend is None else chain_callbacks(self.blend, callback)


def size_multiple(pipe) -> int:
    """What image sides must be multiples of: the VAE factor times the UNet's total downsampling."""
    return latent_size_multiple(pipe.vae, pipe.unet)


def check_image_arguments(pipe, image, mask_image, strength, latents) -> Optional[float]:
    """Check the img2img / inpainting arguments (errors name them); return the strength to use, None without image."""
    latent_channels = int(pipe.vae.config.latent_channels)
    unet_channels = int(pipe.unet.config.in_channels)
    inpainting_unet = unet_channels == 2 * latent_channels + 1  # [x_t, mask, masked-image latents]
    if unet_channels not in (latent_channels, 2 * latent_channels + 1):
        raise ValueError(f"the UNet takes {unet_channels} input channels; this pipeline runs {latent_channels} "
                         f"(text-to-image, img2img) or {2 * latent_channels + 1} (an inpainting UNet)")
    if image is None:
        for name, value in (("mask_image", mask_image), ("strength", strength)):
            if value is not None:
                raise ValueError(f"{name} needs image= (the picture to edit); got {name} without image")
        if inpainting_unet:
            raise ValueError("this is an inpainting UNet: give image= and mask_image= (it cannot run text-to-image)")
        return None
    _check_image_type("image", image)
    if mask_image is not None:
        _check_image_type("mask_image", mask_image)
    elif inpainting_unet:
        raise ValueError("mask_image is required with this inpainting UNet (white: repaint, black: keep)")
    if latents is not None:
        raise ValueError("latents cannot be given with image: img2img and inpainting start from the image's latent")
    return default_strength(strength, inpainting=mask_image is not None)


def default_size(pipe, image: ImageInput, height: Optional[int], width: Optional[int]) -> tuple[Optional[int], Optional[int]]:
    """Unset height / width from the (first) input image, rounded down to a size the model takes."""
    multiple = size_multiple(pipe)
    image_height, image_width = _image_size(image[0] if isinstance(image, (list, tuple)) else image)
    if height is None:
        height = image_height - image_height % multiple
    if width is None:
        width = image_width - image_width % multiple
    if min(height, width) < multiple:
        raise ValueError(f"image is {image_height}×{image_width} pixels; this model needs at least {multiple}×{multiple} "
                         "(or pass height= and width=)")
    return height, width


def prepare_image_edit(pipe, solver, plan: torch.Tensor, image: ImageInput, mask_image: Optional[ImageInput],
                       strength: float, num_prompts: int, num_images_per_prompt: int, height: int, width: int,
                       generator, dtype: torch.dtype, guided: bool) -> ImageEdit:
    """The start of an img2img / inpainting run, as diffusers' img2img and inpaint pipelines prepare it."""
    device, factor = pipe._execution_device, vae_scale_factor(pipe.vae)
    timesteps = strength_timesteps(plan, strength)
    pixels = preprocess_images(image, height, width, factor).to(device)  # (N, 3, H, W) in [-1, 1]
    rows = batch_rows(pixels.shape[0], num_prompts, num_images_per_prompt, "image")
    _check_generators(generator, len(rows))
    latent_size = (height // factor, width // factor)
    shape = (len(rows), int(pipe.vae.config.latent_channels), *latent_size)
    inpainting_unet = pipe.unet.config.in_channels != shape[1]
    pure_noise = mask_image is not None and strength == 1.0  # diffusers' inpainting starts from x_T ~ N(0, I) here
    # 1. z_0 = E(x), the posterior sample (diffusers' retrieve_latents); an inpainting UNet from pure noise needs none
    z0 = None if pure_noise and inpainting_unet else encode_for_batch(pipe.vae, pixels, rows, generator).to(dtype)
    # 2. x at the first timestep: q(x_t | z_0) with noise ε (DDPM eq. 4), or ε itself
    noise = randn(shape, generator, dtype, device)  # (B, C, h, w)
    x = noise if pure_noise else solver.add_noise(z0, noise, timesteps)
    if mask_image is None:
        return ImageEdit(timesteps, x)
    masks = preprocess_masks(mask_image, height, width, factor).to(device)  # (M, 1, H, W) in {0, 1}
    mask = latent_mask(masks, latent_size)[batch_rows(masks.shape[0], num_prompts, num_images_per_prompt,
                                                      "mask_image")].to(dtype)  # (B, 1, h, w)
    if not inpainting_unet:
        return ImageEdit(timesteps, x, blend=KnownRegionBlend(solver.add_noise, z0, noise, mask, timesteps))
    # 3. the inpainting UNet's conditioning: [m, E(x ⊙ (m < ½))], for both CFG halves
    masked = masked_pixels(pixels, masks)  # (max(N, M), 3, H, W)
    masked_rows = batch_rows(masked.shape[0], num_prompts, num_images_per_prompt, "image")
    extra = torch.cat([mask, encode_for_batch(pipe.vae, masked, masked_rows, generator).to(dtype)], dim=1)
    return ImageEdit(timesteps, x, unet_extra=torch.cat([extra, extra]) if guided else extra)


def preprocess_images(image: ImageInput, height: int, width: int, vae_factor: int) -> torch.Tensor:
    """Images -> (N, 3, height, width) float32 in [-1, 1]; tensors and arrays are expected in [0, 1] (as diffusers)."""
    if isinstance(image, (list, tuple)):
        image = [_rgb(i) for i in image]
    else:
        image = _rgb(image)
    pixels = VaeImageProcessor(vae_scale_factor=vae_factor).preprocess(image, height=height, width=width)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"image must be RGB: (3, H, W) / (B, 3, H, W) tensors or (H, W, 3) arrays, got a batch of "
                         f"shape {tuple(pixels.shape)}")
    return pixels.float()


def preprocess_masks(mask_image: ImageInput, height: int, width: int, vae_factor: int) -> torch.Tensor:
    """Masks -> (N, 1, height, width) in {0, 1}: grayscale, resized, binarised at ½ (1: repaint)."""
    processor = VaeImageProcessor(vae_scale_factor=vae_factor, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    masks = processor.preprocess(mask_image, height=height, width=width)
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"mask_image must be single-channel (grayscale), got a batch of shape {tuple(masks.shape)}")
    return masks.float()


def batch_rows(count: int, num_prompts: int, num_images_per_prompt: int, name: str) -> torch.Tensor:
    """Which input feeds each of the B = prompts × images-per-prompt rows: one for all, or one per prompt."""
    if count not in (1, num_prompts):
        raise ValueError(f"{name} holds {count} images for {num_prompts} prompt(s); give one, or one per prompt")
    per_prompt = torch.arange(num_prompts) if count == num_prompts else torch.zeros(num_prompts, dtype=torch.long)
    return per_prompt.repeat_interleave(num_images_per_prompt)


def encode_for_batch(vae, pixels: torch.Tensor, rows: torch.Tensor, generator) -> torch.Tensor:
    """(B, C, h, w) posterior samples of pixels[rows]; a list of generators samples each row with its own.

    One generator samples each distinct input once and repeats the latents, as diffusers does.
    """
    if isinstance(generator, (list, tuple)):
        return encode_images(vae, pixels[rows], list(generator))
    return encode_images(vae, pixels, generator)[rows.to(pixels.device)]


def _check_generators(generator, batch: int) -> None:
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"generator is a list of {len(generator)}, but the batch has {batch} images")


def _check_image_type(name: str, value: Any) -> None:
    """A PIL image, array or tensor, or a non-empty list of one of these kinds."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    kinds = {type(item) for item in items}
    if not items or not all(isinstance(item, IMAGE_TYPES) for item in items) or len(kinds) > 1:
        raise ValueError(f"{name} must be a PIL image, a numpy array, a torch tensor, or a non-empty list of one "
                         f"of these kinds, got {type(value).__name__}")


def _image_size(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image, a (…, H, W) tensor or a (…, H, W, C) array."""
    if isinstance(image, PIL.Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    return int(image.shape[-3]), int(image.shape[-2])


def _rgb(image: Any) -> Any:
    """PIL images in RGB (RGBA, palette and grayscale files too); arrays and tensors as they are."""
    return image.convert("RGB") if isinstance(image, PIL.Image.Image) and image.mode != "RGB" else image
