"""Euler (Karras et al. 2022, Algorithm 1 without the second-order correction), as diffusers' EulerDiscreteScheduler.

The probability-flow ODE dx/dσ = (x − D(x; σ))/σ on x_VE = x_VP/√ᾱ, one Euler step per
timestep from σ_i to σ_{i+1} (σ_n = 0): A1111's "Euler" ("Euler Karras" with
sigma_schedule="karras"). Deterministic; diffusers' s_churn (a step argument, default 0) is not offered.
"""
from __future__ import annotations

import dataclasses

import torch

from latent_diffusion.diffusion.samplers.base import Run
from latent_diffusion.diffusion.samplers.sigmas import VESigmaSampler, to_d


def euler_step(x_ve: torch.Tensor, d: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{i+1} = x_i + (σ_{i+1} − σ_i) d_i (Karras et al. 2022, Algorithm 1, line 5)."""
    return x_ve + (sigma_next - sigma) * d


@dataclasses.dataclass(frozen=True, eq=False)
class EulerSampler(VESigmaSampler):
    """Euler steps in σ; settings as EulerDiscreteScheduler's config (default spacing linspace)."""

    name = "euler"
    unsupported = {
        "interpolation_type": "linear", "timestep_type": "discrete", "final_sigmas_type": "zero",
        "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
    }

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c = run.coefficients
        sigma, sigma_next = c.sigma[i], c.sigma[i + 1]
        # 1. x̂_0 = D(x; σ_i) from the network at the VP point x = x_VE/√(1 + σ²) (diffusers' scale_model_input)
        x0 = run.predict(i, x).x0  # (B, C, H, W)
        # 2. d_i = (x_VE − x̂_0)/σ_i and one Euler step to σ_{i+1} (Algorithm 1, lines 4–5)
        x_ve = x * c.scale[i]
        x_ve = euler_step(x_ve, to_d(x_ve, sigma, x0), sigma, sigma_next)
        # 3. back to the VP form at σ_{i+1}
        return x_ve / c.scale[i + 1]
