"""Heun's second-order method (Karras et al. 2022, Algorithm 1), as diffusers' HeunDiscreteScheduler.

Each step from σ_i to σ_{i+1} takes an Euler step, evaluates the network again there and
averages the two slopes (the trapezoidal rule); the last step, to σ = 0, stays Euler
(Algorithm 1, line 6). 2n − 1 network calls for n timesteps: at equal calls, compare it with
Euler at about twice the steps. diffusers lists each inner timestep twice; our plan holds the
n timesteps once.
"""
from __future__ import annotations

import dataclasses

import torch

from latent_diffusion.diffusion.samplers.base import Run
from latent_diffusion.diffusion.samplers.euler import euler_step
from latent_diffusion.diffusion.samplers.sigmas import VESigmaSampler, to_d


def heun_correction(x_ve: torch.Tensor, d: torch.Tensor, d_next: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x_{i+1} = x_i + (σ_{i+1} − σ_i) (½ d_i + ½ d'_i) (Karras et al. 2022, Algorithm 1, line 8)."""
    return x_ve + (sigma_next - sigma) * 0.5 * (d + d_next)


@dataclasses.dataclass(frozen=True, eq=False)
class HeunSampler(VESigmaSampler):
    """Heun; settings as HeunDiscreteScheduler's config (default spacing linspace)."""

    clip_sample: bool = False
    clip_sample_range: float = 1.0

    name = "heun"
    unsupported = {"use_beta_sigmas": False, "rescale_betas_zero_snr": False}

    def denoise(self, run: Run, i: int, x: torch.Tensor) -> torch.Tensor:
        """x̂_0 at step i's timestep, clipped to [−r, r] if clip_sample (as diffusers, in both stages)."""
        x0 = run.predict(i, x).x0  # (B, C, H, W)
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else x0

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c = run.coefficients
        sigma, sigma_next = c.sigma[i], c.sigma[i + 1]
        # 1. d_i = (x_VE − x̂_0(x; σ_i))/σ_i and the Euler step to σ_{i+1} (Algorithm 1, lines 4–5)
        x_ve = x * c.scale[i]
        d = to_d(x_ve, sigma, self.denoise(run, i, x))
        x_euler = euler_step(x_ve, d, sigma, sigma_next)
        if sigma_next == 0.0:  # the last step stays first order (line 6)
            return x_euler
        # 2. d'_i at (x_{i+1}, σ_{i+1}) from a second network call at the next timestep (line 7)
        d_next = to_d(x_euler, sigma_next, self.denoise(run, i + 1, x_euler / c.scale[i + 1]))
        # 3. the trapezoidal step with the mean slope (line 8), back to the VP form
        return heun_correction(x_ve, d, d_next, sigma, sigma_next) / c.scale[i + 1]
