"""The VAE's latent space: latent scaling, encode, decode, and the size multiple images must have.

z_unet = (z_vae − shift) · scale with both read from the VAE's config (no magic 0.18215); one
rule decides when a half-precision VAE runs in float32 (`half_vae_runs_in_float32`), and one
context casts it there and back (`float32_vae`): `upcast_half_vae` and `decode_latents` use both.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch

from latent_diffusion.tensors import module_device, module_dtype


def latent_scale(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of the VAE's config: z_unet = (z_vae − shift) · scale (no magic 0.18215)."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along a side: 2^(number of down blocks − 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def scale_latents(vae, z_vae: torch.Tensor) -> torch.Tensor:
    """z = (z_VAE − shift) · scale: the VAE's latents in the UNet's (unit-variance) space (LDM §4.3, SD3's shift)."""
    scale, shift = latent_scale(vae)
    return (z_vae - shift) * scale


def unscale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """z_VAE = z / scale + shift, the inverse of `scale_latents`."""
    scale, shift = latent_scale(vae)
    return z / scale + shift


def encode_images(vae, pixels: torch.Tensor, generator: Optional[torch.Generator] = None, sample: bool = True) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/f, W/f) scaled latents, sampled from the posterior or its mean."""
    dist = vae.encode(pixels.to(device=module_device(vae), dtype=module_dtype(vae))).latent_dist
    return scale_latents(vae, dist.sample(generator) if sample else dist.mean)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_half(module) -> bool:
    """Whether a module's weights are float16 or bfloat16."""
    return module_dtype(module) in HALF_DTYPES


def half_vae_runs_in_float32(vae, force_upcast: bool = True, overflowed: bool = False) -> bool:
    """The one rule for when a half-precision VAE runs in float32 instead of its own dtype.

    A float16 VAE whose config sets `force_upcast` (SDXL's, which overflows in fp16; diffusers'
    rule) when `force_upcast` applies to this call, and any half VAE whose decode `overflowed`
    (inf/NaN: the black images of fp16 SD VAEs). A float32 VAE always stays as it is.
    """
    if not is_half(vae):
        return False
    configured = module_dtype(vae) == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    return overflowed or (force_upcast and configured)


@contextlib.contextmanager
def float32_vae(vae, enabled: bool = True):
    """Run the block with the VAE cast to float32 when `enabled`, then cast it back to its own dtype."""
    dtype = module_dtype(vae)
    if enabled:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if enabled:
            vae.to(dtype)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) scaled latents -> (B, 3, h·f, w·f) pixels in [-1, 1] (not clamped).

    A half-precision VAE whose decode overflows decodes again in float32 (`half_vae_runs_in_float32`);
    the pixels then come back in float32. Latents are cast to the VAE's dtype, so they follow an upcast.
    """
    pixels = _decode(vae, latents)
    overflowed = is_half(vae) and not bool(torch.isfinite(pixels).all())
    if half_vae_runs_in_float32(vae, force_upcast=False, overflowed=overflowed):
        warnings.warn(f"the {vae.dtype} VAE decode overflowed (inf/NaN); decoding again in float32", stacklevel=2)
        with float32_vae(vae):
            return _decode(vae, latents)
    return pixels


def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents decoded in the VAE's dtype (`unscale_latents` first)."""
    return vae.decode(unscale_latents(vae, latents.to(module_dtype(vae)))).sample  # (B, 3, H, W)


def upcast_half_vae(vae, enabled: bool = True):
    """Run the block with a float16 VAE whose config sets `force_upcast` in float32 (`half_vae_runs_in_float32`
    with force_upcast=`enabled`), then cast it back; SDXL's VAE overflows in float16, and diffusers'
    StableDiffusionXLPipeline upcasts it the same way.
    """
    return float32_vae(vae, half_vae_runs_in_float32(vae, force_upcast=enabled))


def latent_size_multiple(vae, unet) -> int:
    """Pixels an image side must be a multiple of: the VAE's factor × the UNet's downsampling (2^(blocks − 1))."""
    return vae_scale_factor(vae) * 2 ** (len(unet.config.block_out_channels) - 1)
