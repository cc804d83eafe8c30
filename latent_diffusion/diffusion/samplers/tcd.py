"""TCD (Zheng et al. 2024, trajectory consistency distillation): strategic stochastic sampling, as TCDScheduler.

From x_t the network's (x̂_0, ε̂) give the point of the trajectory at an intermediate time
s = ⌊(1 − γ) t'⌋, t' the next timestep of the plan (TCD eq. 12's semi-linear consistency function,
a DDIM jump): x̂_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s) ε̂. Strategic stochastic sampling (TCD §4.4, Algorithm 4)
then re-noises forward from s to t': x_{t'} = √(ᾱ_{t'}/ᾱ_s) x̂_s + √(1 − ᾱ_{t'}/ᾱ_s) z, z ~ N(0, I).
γ (diffusers' `eta`) = 0 is deterministic (DDIM steps); γ = 1 jumps to x̂_0 and re-noises, as LCM.
The final step goes to t' = 0 and returns x̂_s without noise. The plan is LCM's (`consistency_timesteps`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from latent_diffusion.tensors import randn
from latent_diffusion.diffusion.samplers.base import Run, Sampler
from latent_diffusion.diffusion.samplers.lcm import consistency_timesteps, next_timesteps


@dataclasses.dataclass(frozen=True, eq=False)
class TCDSampler(Sampler):
    """TCD with γ = `eta` in [0, 1] (diffusers' step default 0.3); settings as TCDScheduler's config."""

    eta: float = 0.3
    original_inference_steps: int = 50

    name = "tcd"
    # TCDScheduler.step reads neither clip_sample nor thresholding, so neither is refused here

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta (TCD's gamma) must be in [0, 1], got {self.eta}")

    def plan(self, num_inference_steps: int) -> torch.Tensor:
        return consistency_timesteps(self.schedule.num_train_timesteps, self.original_inference_steps, num_inference_steps)

    def coefficients(self, timesteps: torch.Tensor) -> "TCDCoefficients":
        """Per-step ᾱ_t, ᾱ_s at s = ⌊(1 − γ) t'⌋ and ᾱ_{t'}, once per call (s in float32 as diffusers floors it)."""
        alphas_cumprod = self.schedule.alphas_cumprod
        nxt = next_timesteps(timesteps, last=0)
        s = torch.floor((1 - self.eta) * nxt).long()
        return TCDCoefficients(alphas_cumprod[timesteps].tolist(), alphas_cumprod[s].tolist(), alphas_cumprod[nxt].tolist())

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c = run.coefficients
        eps, x0 = run.predict(i, x)  # each (B, C, H, W)
        # x̂_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s) ε̂ (TCD eq. 12 with the DDIM parametrisation)
        ab_s = c.alpha_bar_s[i]
        x_s = ab_s**0.5 * x0 + (1.0 - ab_s) ** 0.5 * eps
        if self.eta == 0 or i == len(run.timesteps) - 1:
            return x_s
        # forward from s to t': x_{t'} = √(ᾱ_{t'}/ᾱ_s) x̂_s + √(1 − ᾱ_{t'}/ᾱ_s) z (TCD Algorithm 4, line 8)
        ratio = c.alpha_bar_next[i] / ab_s
        return ratio**0.5 * x_s + (1.0 - ratio) ** 0.5 * randn(x.shape, run.generator, x.dtype, x.device)


class TCDCoefficients(NamedTuple):
    """Per-step values of TCD's update, each a list of n."""

    alpha_bar: list[float]  # ᾱ_t
    alpha_bar_s: list[float]  # ᾱ_s, s = ⌊(1 − γ) t'⌋
    alpha_bar_next: list[float]  # ᾱ_{t'}
