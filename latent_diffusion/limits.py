"""Bounds on the work and memory of one pipeline call, checked before anything runs.

A size the argument checks allow can still exhaust memory (8192×8192 images, 100000 images, a 1 MB
prompt), and the failure is then an allocator traceback minutes in. `estimate_call_memory` predicts the
peak activation memory of a call from the model *configs* alone (no weights touched), so the pipeline,
the CLI and a server can refuse with one line naming the argument and the limit:

    peak ≈ max(UNet forward, VAE decode) + the output pixels

UNet forward: the skip connections the down path keeps for the up path, Σ_level (layers + 1)·C·h·w, plus a
working set of UNET_WORKING copies of the largest feature map; per latent in the batch (×2 with
classifier-free guidance). VAE decode: VAE_WORKING copies of its largest feature map (the full-resolution
one: 128 channels × H × W for SD's VAE), per image. These factors are calibrated on CPU against the peak
resident memory of SD-1.5-shaped networks (VAE decode at 512² and 1024²: 1.0 and 3.9 GiB measured, 1.0 and
4.0 estimated; a UNet of SD's layout at 1024²: within 20%); the estimate is a guard against requests
that cannot fit, not a byte-exact prediction. `work_units` (latent pixels × images × network calls) is the
measure a server bounds per request.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch

from latent_diffusion.checks import MAX_IMAGE_SIDE

MAX_PROMPT_CHARS = 10_000  # ~2500 CLIP tokens = 33 windows of 77; longer text is a paste accident, not a prompt
MAX_IMAGES_PER_CALL = 256  # images per pipeline call (batch); more is a loop of calls, not one call
MAX_CHANNELS = 8192  # any one block_out_channels / latent channels entry of a model config
MAX_LAYERS_PER_BLOCK = 32
UNET_WORKING = 40  # live copies of the largest UNet feature map (resnet, norm, q/k/v, the 8×-wide GEGLU feed-forward)
VAE_WORKING = 8  # live copies of the largest VAE decoder feature map (conv in/out, group norm, upsample)
GIB = 1024 ** 3


def network_calls(sampler: str, steps: int) -> int:
    """UNet calls of one sampling run: Heun evaluates twice per step but the last (2n − 1), the others once."""
    return 2 * steps - 1 if sampler == "heun" else steps


def work_units(images: int, latent_height: int, latent_width: int, sampler: str, steps: int, guided: bool) -> int:
    """Latent pixels × UNet batch × network calls: proportional to a call's compute, for bounding requests."""
    return latent_height * latent_width * images * (2 if guided else 1) * network_calls(sampler, steps)


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def _levels(config: Any, height: int, width: int) -> list[tuple[int, int]]:
    """(channels, pixels) of each resolution level: level i has block_out_channels[i] at size / 2^i."""
    return [(int(c), max(1, height >> i) * max(1, width >> i)) for i, c in enumerate(_get(config, "block_out_channels"))]


def unet_activation_elements(unet_config: Any, latent_height: int, latent_width: int) -> int:
    """Elements alive at the UNet's peak for one latent: the skips kept for the up path plus a working set."""
    levels = _levels(unet_config, latent_height, latent_width)
    layers = int(_get(unet_config, "layers_per_block", 2))
    skips = sum((layers + 1) * c * n for c, n in levels)
    return skips + UNET_WORKING * max(c * n for c, n in levels)


def vae_decode_elements(vae_config: Any, height: int, width: int) -> int:
    """Elements alive at the VAE decoder's peak for one image: its largest feature map (reversed levels)."""
    levels = _levels(vae_config, height, width)  # decoder level i has block_out_channels[i] at H / 2^i too
    return VAE_WORKING * max(c * n for c, n in levels)


def estimate_call_memory(unet_config: Any, vae_config: Any, images: int, height: int, width: int, guided: bool,
                         vae_factor: int = 8, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of activations a call's peak needs: max(UNet forward, VAE decode) + the float output pixels."""
    item = torch.tensor([], dtype=dtype).element_size()
    unet = images * (2 if guided else 1) * unet_activation_elements(unet_config, height // vae_factor,
                                                                    width // vae_factor)
    vae = images * vae_decode_elements(vae_config, height, width)
    pixels = images * 3 * height * width * 4  # float32 output before PIL
    return max(unet, vae) * item + pixels


def available_memory(device: Any = "cpu") -> int:
    """Bytes free for a call on `device`: CUDA's free memory, else the host's MemAvailable (or all of RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(device: Any = "cpu") -> int:
    """The bytes a call may plan to use: LATENT_DIFFUSION_MEMORY_GIB when set (a fixed budget), else what is free."""
    fixed = os.environ.get("LATENT_DIFFUSION_MEMORY_GIB")
    return int(float(fixed) * GIB) if fixed else available_memory(device)


def check_call_size(unet_config: Any, vae_config: Any, *, images: int, height: int, width: int, guided: bool,
                    vae_factor: int = 8, dtype: torch.dtype = torch.float32, budget: Optional[int] = None,
                    names: Optional[Mapping[str, str]] = None) -> int:
    """ValueError naming the image count or the size when the call's estimated memory exceeds `budget`.

    `names` maps "images", "height", "width" to the caller's spelling (e.g. "--n"). Returns the estimate.
    """
    names = {"images": "num_images_per_prompt", "height": "height", "width": "width", **(names or {})}
    if images > MAX_IMAGES_PER_CALL:
        raise ValueError(f"{names['images']} asks for {images} images in one call; at most {MAX_IMAGES_PER_CALL}")
    need = estimate_call_memory(unet_config, vae_config, images, height, width, guided, vae_factor, dtype)
    budget = memory_budget() if budget is None else budget
    if need > budget:
        one = estimate_call_memory(unet_config, vae_config, 1, height, width, guided, vae_factor, dtype)
        culprit = (f"{names['height']} × {names['width']} ({height}×{width})" if one > budget
                   else f"{names['images']} ({images})")
        raise ValueError(f"{culprit} needs about {need / GIB:.3g} GiB for this model, more than the "
                         f"{budget / GIB:.3g} GiB available; use fewer or smaller images")
    return need


def check_prompt_length(name: str, prompts: list[str]) -> None:
    """ValueError naming `name` for a prompt longer than MAX_PROMPT_CHARS characters."""
    longest = max((len(p) for p in prompts), default=0)
    if longest > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} must be at most {MAX_PROMPT_CHARS} characters, got {longest}")


def check_model_config(config: Mapping[str, Any], where: str, max_sample_size: int = MAX_IMAGE_SIDE) -> None:
    """ValueError naming the config file and key for sizes no machine could hold (sample_size 10⁶, 10⁹ channels).

    `max_sample_size`: in the config's own unit (a UNet's is latent pixels: MAX_IMAGE_SIDE / 8).
    """
    for key in ("block_out_channels",):
        values = config.get(key)
        if values is not None and (not isinstance(values, (list, tuple)) or not values or not all(
                isinstance(v, int) and 1 <= v <= MAX_CHANNELS for v in values)):
            raise ValueError(f"{where} {key} must be a list of integers from 1 to {MAX_CHANNELS}, got {values!r}")
    for key, high in (("in_channels", MAX_CHANNELS), ("out_channels", MAX_CHANNELS), ("latent_channels", MAX_CHANNELS),
                      ("layers_per_block", MAX_LAYERS_PER_BLOCK), ("sample_size", max_sample_size)):
        value = config.get(key)
        if isinstance(value, (list, tuple)):  # diffusers allows a per-side sample_size
            value = max(value, default=0)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high):
            raise ValueError(f"{where} {key} must be an integer from 1 to {high}, got {value!r}")


def check_pipeline_call(pipe, prompts: list[str], negatives: list[str], images_per_prompt: int, height: int,
                        width: int, guided: bool, names: Optional[Mapping[str, str]] = None) -> int:
    """A pipeline call's prompt lengths and estimated memory (on the pipe's device) against the limits."""
    from latent_diffusion.tensors import module_device, module_dtype
    from latent_diffusion.vae import vae_scale_factor

    check_prompt_length("prompt", prompts)
    check_prompt_length("negative_prompt", negatives)
    batch = "num_images_per_prompt" if len(prompts) == 1 else "len(prompt) × num_images_per_prompt"
    return check_call_size(pipe.unet.config, pipe.vae.config, images=len(prompts) * images_per_prompt,
                           height=height, width=width, guided=guided, vae_factor=vae_scale_factor(pipe.vae),
                           dtype=module_dtype(pipe.unet), budget=memory_budget(module_device(pipe.unet)),
                           names={"images": batch, **(names or {})})
