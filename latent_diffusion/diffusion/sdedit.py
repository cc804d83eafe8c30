"""SDEdit (Meng et al. 2022): start the reverse process part-way, from the input's latent noised to t_start.

`strength` s ∈ (0, 1] chooses how much of an n-step plan runs: the last
⌊n·s⌋ steps (at least one), exactly as diffusers' img2img and inpaint
pipelines cut their scheduler's timesteps, so the same strength visits the
same timesteps. The sampler's `add_noise` then gives x at the tail's first
timestep, q(x_t | x_0).
"""
from __future__ import annotations

import torch

from latent_diffusion.checks import check_finite

IMG2IMG_STRENGTH = 0.8  # diffusers' StableDiffusionImg2ImgPipeline default
INPAINT_STRENGTH = 1.0  # diffusers' StableDiffusionInpaintPipeline default: the hole starts from pure noise


def default_strength(strength, inpainting: bool) -> float:
    """The strength to use: the given one, checked, or the img2img / inpainting default."""
    if strength is None:
        return INPAINT_STRENGTH if inpainting else IMG2IMG_STRENGTH
    return check_strength(strength)


def check_strength(strength: float) -> float:
    """A finite strength in (0, 1]; 0 would run no step at all."""
    value = check_finite("strength", strength, minimum=0.0, maximum=1.0)
    if value == 0.0:
        raise ValueError(f"strength must be a finite number > 0 and <= 1, got {strength!r}")
    return value


def tail_start(num_inference_steps: int, strength: float) -> int:
    """Index of the first step that runs: n − min(⌊n·s⌋, n) (diffusers' `get_timesteps`), kept below n.

    Every plan of ours has one timestep per step, so diffusers' `t_start * scheduler.order` is t_start
    here (DPM-Solver++'s multistep order is not a per-step count: its `scheduler.order` is 1 too).
    """
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    return min(max(num_inference_steps - init_steps, 0), num_inference_steps - 1)


def strength_timesteps(plan: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of an n-step plan that img2img runs at `strength` (at least its last timestep)."""
    return plan[tail_start(int(plan.shape[0]), check_strength(strength)):]
