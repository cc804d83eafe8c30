"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), strided as diffusers' DDPMScheduler strides it.

With n < T steps, each step goes from t to the next visited timestep s (or to
"before 0" after the last one, where ᾱ = 1), using the posterior of the
strided chain: α_t|s = ᾱ_t / ᾱ_s, β_t|s = 1 − α_t|s.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from latent_diffusion.checks import check_choice
from latent_diffusion.diffusion.gaussian import posterior_mean_coefficients, posterior_variance, step_beta
from latent_diffusion.tensors import randn
from latent_diffusion.diffusion.samplers.base import Run, Sampler

# "fixed_small_log" gives the same σ_t as "fixed_small" in diffusers (it stores the std directly).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
MIN_VARIANCE = 1e-20  # diffusers clamps β̃ here before the square root


def previous_alpha_bars(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """ᾱ_s for each step t_i -> s = t_{i+1}; after the last step s = −1 and ᾱ_s = 1."""
    prev = alphas_cumprod[timesteps[1:]]
    return torch.cat([prev, prev.new_ones(1)])


def ancestral_std(alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor, variance_type: str) -> torch.Tensor:
    """σ_t of Algorithm 2: √β̃_t ("fixed_small", the posterior's, `gaussian.posterior_variance`) or √β_t ("fixed_large", DDPM §3.2)."""
    if variance_type == "fixed_large":
        return step_beta(alpha_bar, alpha_bar_prev).sqrt()
    return posterior_variance(alpha_bar, alpha_bar_prev).clamp(min=MIN_VARIANCE).sqrt()


@dataclasses.dataclass(frozen=True, eq=False)
class DDPMSampler(Sampler):
    """Ancestral sampling x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z; settings as DDPMScheduler's config."""

    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    name = "ddpm"
    unsupported = {"thresholding": False}

    def __post_init__(self):
        super().__post_init__()
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)

    def coefficients(self, timesteps: torch.Tensor) -> "DDPMCoefficients":
        """Per-step ᾱ_t, c_0, c_t, σ_t (float64, once per call) and whether noise is added (t > 0, as diffusers)."""
        alpha_bar = self.schedule.alphas_cumprod[timesteps]  # (n,)
        alpha_bar_prev = previous_alpha_bars(self.schedule.alphas_cumprod, timesteps)  # (n,)
        coef_x0, coef_xt = posterior_mean_coefficients(alpha_bar, alpha_bar_prev)
        std = ancestral_std(alpha_bar, alpha_bar_prev, self.variance_type)
        return DDPMCoefficients(alpha_bar.tolist(), coef_x0.tolist(), coef_xt.tolist(), std.tolist(),
                                (timesteps > 0).tolist())

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c, r = run.coefficients, self.clip_sample_range
        # 1. x̂_0 from the network (DDPM eq. 15 for ε), clipped to [−r, r] if clip_sample
        x0 = run.predict(i, x).x0  # (B, C, H, W)
        if self.clip_sample:
            x0 = x0.clamp(-r, r)
        # 2. μ̃_t(x_t, x̂_0) = c_0 x̂_0 + c_t x_t (DDPM eq. 7; c_0, c_t from gaussian.posterior_mean_coefficients)
        x = c.coef_x0[i] * x0 + c.coef_xt[i] * x
        # 3. x_{t−1} = μ̃_t + σ_t z, z ~ N(0, I), except when t = 0 (Algorithm 2, lines 3–4)
        if c.noisy[i]:
            x = x + c.std[i] * randn(x.shape, run.generator, x.dtype, x.device)
        return x


class DDPMCoefficients(NamedTuple):
    """Per-step values of DDPM's update, each a list of n."""

    alpha_bar: list[float]  # ᾱ_t
    coef_x0: list[float]  # c_0 of μ̃_t
    coef_xt: list[float]  # c_t of μ̃_t
    std: list[float]  # σ_t
    noisy: list[bool]  # whether z is added (t > 0)
