"""LCM (Luo et al. 2023, latent consistency models): multistep consistency sampling, as diffusers' LCMScheduler.

A consistency model f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0(x_t, t) maps any point of the
PF-ODE trajectory to its origin (LCM eq. 9; Song et al. 2023, eq. 7); the boundary scalings
c_skip(t) = σ_d² / ((st)² + σ_d²) and c_out(t) = st / √((st)² + σ_d²), σ_d = 0.5 and s the
`timestep_scaling`, make f_θ(x, 0) = x. Multistep sampling (LCM Algorithm 3) alternates: denoise to
ẑ_0 = f_θ(x_t, t), then re-noise to the next timestep s, x_s = √ᾱ_s ẑ_0 + √(1 − ᾱ_s) z, z ~ N(0, I);
the last step returns ẑ_0 itself.

The plan, as LCMScheduler.set_timesteps: the distillation grid of `original_inference_steps` N
timesteps t_j = j ⌊T/N⌋ − 1 (j = 1..N), from which n are taken at evenly spaced indices (largest first).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch

from latent_diffusion.tensors import randn
from latent_diffusion.diffusion.samplers.base import Run, Sampler

SIGMA_DATA = 0.5  # σ_d of the boundary scalings (LCM §4.1, as diffusers)


def consistency_timesteps(num_train: int, original_steps: int, n: int) -> torch.Tensor:
    """n of the N = `original_steps` skipping-step timesteps j⌊T/N⌋ − 1, at indices ⌊i N / n⌋ of the descending grid."""
    if not 1 <= original_steps <= num_train:
        raise ValueError(f"original_inference_steps must be between 1 and {num_train}, got {original_steps}")
    if n > original_steps:
        raise ValueError(
            f"num_inference_steps must be at most original_inference_steps={original_steps} for the LCM/TCD plan, got {n}"
        )
    grid = (np.arange(1, original_steps + 1) * (num_train // original_steps) - 1)[::-1]  # (N,) descending
    indices = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
    return torch.from_numpy(grid[indices].copy()).long()


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) of LCM eq. 9 at scaled time st (float32, as diffusers computes them from a long t)."""
    st = timesteps * timestep_scaling  # long × float: float32
    c_skip = SIGMA_DATA**2 / (st**2 + SIGMA_DATA**2)
    c_out = st / (st**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def next_timesteps(timesteps: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """The timestep each step goes to: the plan's next one; after the final step `last` (None: the final one itself)."""
    final = timesteps[-1:] if last is None else torch.tensor([last], dtype=timesteps.dtype)
    return torch.cat([timesteps[1:], final])


@dataclasses.dataclass(frozen=True, eq=False)
class LCMSampler(Sampler):
    """LCM multistep sampling; settings as LCMScheduler's config (`original_inference_steps`, `timestep_scaling`)."""

    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    name = "lcm"
    unsupported = {"thresholding": False}

    def plan(self, num_inference_steps: int) -> torch.Tensor:
        return consistency_timesteps(self.schedule.num_train_timesteps, self.original_inference_steps, num_inference_steps)

    def coefficients(self, timesteps: torch.Tensor) -> "LCMCoefficients":
        """Per-step ᾱ_t, ᾱ of the next timestep and c_skip, c_out, once per call."""
        alphas_cumprod = self.schedule.alphas_cumprod
        c_skip, c_out = boundary_scalings(timesteps, self.timestep_scaling)
        alpha_bar_next = alphas_cumprod[next_timesteps(timesteps)]
        return LCMCoefficients(alphas_cumprod[timesteps].tolist(), alpha_bar_next.tolist(), c_skip.tolist(), c_out.tolist())

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c, r = run.coefficients, self.clip_sample_range
        _, x0 = run.predict(i, x)  # (B, C, H, W)
        if self.clip_sample:
            x0 = x0.clamp(-r, r)
        # ẑ_0 = f_θ(x_t, t) = c_skip x_t + c_out x̂_0 (LCM eq. 9)
        denoised = c.c_out[i] * x0 + c.c_skip[i] * x
        if i == len(run.timesteps) - 1:
            return denoised
        # x_s = √ᾱ_s ẑ_0 + √(1 − ᾱ_s) z (LCM Algorithm 3, line 6)
        noise = randn(x.shape, run.generator, x.dtype, x.device)
        ab = c.alpha_bar_next[i]
        return ab**0.5 * denoised + (1.0 - ab) ** 0.5 * noise


class LCMCoefficients(NamedTuple):
    """Per-step values of LCM's update, each a list of n."""

    alpha_bar: list[float]  # ᾱ_t
    alpha_bar_next: list[float]  # ᾱ_s, s the next timestep of the plan
    c_skip: list[float]
    c_out: list[float]
