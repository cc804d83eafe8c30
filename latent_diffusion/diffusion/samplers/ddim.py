"""DDIM (Song et al. 2021): the non-Markovian sampler, deterministic at η = 0, as diffusers' DDIMScheduler runs it.

Each step goes from t to s = t − ⌊T/n⌋ (diffusers' rule, whatever the spacing);
for s < 0 the "final" ᾱ is 1 (`set_alpha_to_one`) or ᾱ_0.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from latent_diffusion.diffusion.gaussian import posterior_variance
from latent_diffusion.tensors import randn
from latent_diffusion.diffusion.samplers.base import Run, Sampler


def ddim_previous_timesteps(num_train: int, timesteps: torch.Tensor, plan_steps: int | None = None) -> torch.Tensor:
    """s = t − ⌊T/n⌋, where each DDIM step lands (negative: past the end); n is the plan's length (`plan_steps`,
    for a tail of it)."""
    return timesteps - num_train // (plan_steps or timesteps.shape[0])


def alpha_bars_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, final: float) -> torch.Tensor:
    """ᾱ_s, or `final` where s < 0 (DDIMScheduler's final_alpha_cumprod)."""
    picked = alphas_cumprod[timesteps.clamp(min=0)]
    return torch.where(timesteps >= 0, picked, torch.full_like(picked, final))


def ddim_previous_alpha_bars(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, final: float, plan_steps: int | None = None
) -> torch.Tensor:
    """ᾱ_s for s = t − ⌊T/n⌋, or `final` where s < 0."""
    return alpha_bars_at(alphas_cumprod, ddim_previous_timesteps(alphas_cumprod.shape[0], timesteps, plan_steps), final)


def ddim_sigma(alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_t(η) = η √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) √(1 − ᾱ_t / ᾱ_{t−1}) = η √β̃_t (DDIM eq. 16)."""
    return eta * posterior_variance(alpha_bar, alpha_bar_prev).sqrt()


def ddim_coefficients(alpha_bar_prev: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z (DDIM eq. 12): the x̂_0 and ε̂ coefficients."""
    return alpha_bar_prev.sqrt(), (1.0 - alpha_bar_prev - sigma**2).sqrt()


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSampler(Sampler):
    """DDIM with η (0: deterministic; 1: DDPM-like); settings as DDIMScheduler's config, `eta` as its step argument."""

    eta: float = 0.0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True

    name = "ddim"
    unsupported = {"thresholding": False}

    def __post_init__(self):
        super().__post_init__()
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @property
    def final_alpha_bar(self) -> float:
        """ᾱ where a step lands past the end: 1 (`set_alpha_to_one`) or ᾱ_0."""
        return 1.0 if self.set_alpha_to_one else self.schedule.alphas_cumprod[0].item()

    def coefficients(self, timesteps: torch.Tensor) -> "DDIMCoefficients":
        """Per-step ᾱ_t and the eq. 12 coefficients, in float64, once per call."""
        alphas_cumprod = self.schedule.alphas_cumprod
        alpha_bar = alphas_cumprod[timesteps]  # (n,)
        alpha_bar_prev = ddim_previous_alpha_bars(alphas_cumprod, timesteps, self.final_alpha_bar,
                                                  self.plan_length(timesteps))  # (n,)
        sigma = ddim_sigma(alpha_bar, alpha_bar_prev, self.eta)
        coef_x0, coef_eps = ddim_coefficients(alpha_bar_prev, sigma)
        return DDIMCoefficients(alpha_bar.tolist(), coef_x0.tolist(), coef_eps.tolist(), sigma.tolist())

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c, r = run.coefficients, self.clip_sample_range
        # 1. ε̂ and x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (DDIM eq. 9); only x̂_0 is clipped, as in diffusers
        eps, x0 = run.predict(i, x)  # each (B, C, H, W)
        if self.clip_sample:
            x0 = x0.clamp(-r, r)
        # 2. x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ (DDIM eq. 12, "direction pointing to x_t")
        x = c.coef_x0[i] * x0 + c.coef_eps[i] * eps
        # 3. + σ_t z, z ~ N(0, I), drawn at every step when η > 0 (DDIM eq. 12, "random noise")
        if self.eta > 0:
            x = x + c.sigma[i] * randn(x.shape, run.generator, x.dtype, x.device)
        return x


class DDIMCoefficients(NamedTuple):
    """Per-step values of DDIM's update (eq. 12), each a list of n."""

    alpha_bar: list[float]  # ᾱ_t
    coef_x0: list[float]  # √ᾱ_{t−1}
    coef_eps: list[float]  # √(1 − ᾱ_{t−1} − σ_t²)
    sigma: list[float]  # σ_t(η)
