"""Euler ancestral (k-diffusion `sample_euler_ancestral`), as diffusers' EulerAncestralDiscreteScheduler: A1111's "Euler a".

Each step goes deterministically (Euler) from σ_i down to σ_down < σ_{i+1}, then adds fresh
noise σ_up z to reach σ_{i+1}: the DDPM-like ancestral split σ_{i+1}² = σ_down² + σ_up² with
σ_up = σ_{i+1} √(σ_i² − σ_{i+1}²)/σ_i (η = 1). z is drawn at every step, the last one too (where
σ_up = 0), in x's dtype from the caller's generator, as diffusers' `randn_tensor` draws it, so the
same seed gives diffusers' image. diffusers offers no Karras/exponential σ for this scheduler, nor do we.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from latent_diffusion.tensors import randn
from latent_diffusion.diffusion.samplers.base import Run
from latent_diffusion.diffusion.samplers.euler import euler_step
from latent_diffusion.diffusion.samplers.sigmas import VESigmaSampler, to_d


def ancestral_sigmas(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_{i+1}², σ_up² = σ_{i+1}² (σ_i² − σ_{i+1}²)/σ_i² (k-diffusion get_ancestral_step)."""
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@dataclasses.dataclass(frozen=True, eq=False)
class EulerAncestralSampler(VESigmaSampler):
    """Euler a; settings as EulerAncestralDiscreteScheduler's config (default spacing linspace)."""

    name = "euler_a"
    sigma_schedules = ("default",)

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c = run.coefficients
        sigma, sigma_next = c.sigma[i], c.sigma[i + 1]
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)
        # 1. x̂_0 = D(x; σ_i) at the VP point
        x0 = run.predict(i, x).x0  # (B, C, H, W)
        # 2. deterministic Euler step from σ_i to σ_down
        x_ve = x * c.scale[i]
        x_ve = euler_step(x_ve, to_d(x_ve, sigma, x0), sigma, sigma_down)
        # 3. + σ_up z, z ~ N(0, I), back up to σ_{i+1}
        x_ve = x_ve + sigma_up * randn(x.shape, run.generator, x.dtype, x.device)
        return x_ve / c.scale[i + 1]
