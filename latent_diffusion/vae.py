"""The VAE's latent space: latent scaling, encode, decode, and the size multiple images must have.

z_unet = (z_vae − shift) · scale with both read from the VAE's config (no magic 0.18215); one
place decides when a half-precision VAE runs in float32 (`upcast_half_vae`, `decode_latents`).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch


def latent_scale(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE's config: z_unet = (z_vae − shift) · scale (no magic 0.18215)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along a side: 2^(number of down blocks − 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def encode_images(vae, pixels: torch.Tensor, generator: Optional[torch.Generator] = None, sample: bool = True) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/f, W/f) scaled latents, sampled from the posterior or its mean."""
    scale, shift = latent_scale(vae)
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mean
    return (z - shift) * scale


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) scaled latents -> (B, 3, h·f, w·f) pixels in [-1, 1] (not clamped).

    A half-precision VAE whose decode overflows (inf/NaN: the black images of fp16 SD VAEs) decodes
    again in float32; the pixels then come back in float32.
    """
    scale, shift = latent_scale(vae)
    pixels = vae.decode(latents.to(vae.dtype) / scale + shift).sample  # (B, 3, H, W)
    if vae.dtype in (torch.float16, torch.bfloat16) and not bool(torch.isfinite(pixels).all()):
        return decode_latents_fp32(vae, latents)
    return pixels


def decode_latents_fp32(vae, latents: torch.Tensor) -> torch.Tensor:
    """decode_latents with the VAE cast to float32 for this one call (its dtype is restored after)."""
    scale, shift = latent_scale(vae)
    dtype = vae.dtype
    warnings.warn(f"the {dtype} VAE decode overflowed (inf/NaN); decoding again in float32", stacklevel=3)
    try:
        vae.to(torch.float32)
        return vae.decode(latents.to(torch.float32) / scale + shift).sample  # (B, 3, H, W)
    finally:
        vae.to(dtype)


@contextlib.contextmanager
def upcast_half_vae(vae, enabled: bool = True):
    """Run the block with a float16 VAE whose config sets `force_upcast` in float32, then cast it back.

    SDXL's VAE overflows in float16 (diffusers' StableDiffusionXLPipeline upcasts it the same way);
    `decode_latents` casts the latents to the VAE's dtype, so they follow.
    """
    upcast = enabled and vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


def latent_size_multiple(vae, unet) -> int:
    """Pixels an image side must be a multiple of: the VAE's factor × the UNet's downsampling (2^(blocks − 1))."""
    return vae_scale_factor(vae) * 2 ** (len(unet.config.block_out_channels) - 1)
