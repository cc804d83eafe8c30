"""Noise schedules: β_t, ᾱ_t and zero-terminal-SNR rescaling, computed in float64.

A `NoiseSchedule` is read from a diffusers `scheduler_config.json`, so every
Stable Diffusion checkpoint brings its own schedule, and ours stay loadable by
diffusers.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
F64 = torch.float64


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """β_t evenly spaced from β_1 to β_T (DDPM, Ho et al. 2020 §4)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=F64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """√β_t evenly spaced, then squared: the Stable Diffusion schedule."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=F64) ** 2


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """ᾱ(t) = cos²((t + s)/(1 + s) · π/2), t ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17)."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = min(1 − ᾱ(t/T)/ᾱ((t−1)/T), max_beta), the clipped cosine schedule."""
    return torch.tensor(_cosine_beta_values(num_timesteps, s, max_beta), dtype=F64)


@functools.lru_cache(maxsize=8)
def _cosine_beta_values(num_timesteps: int, s: float, max_beta: float) -> tuple[float, ...]:
    """`cosine_betas` as floats, kept: in Python, as diffusers computes them, they cost 2 ms per pipeline call."""
    return tuple(
        min(1 - cosine_alpha_bar((i + 1) / num_timesteps, s) / cosine_alpha_bar(i / num_timesteps, s), max_beta)
        for i in range(num_timesteps)
    )


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s)."""
    return torch.cumprod(1.0 - betas.to(F64), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ_t so that √ᾱ_T = 0 while √ᾱ_1 is kept (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = alphas_cumprod(betas).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def make_betas(
    beta_schedule: str, num_timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02
) -> torch.Tensor:
    """β_1..β_T for a schedule named as diffusers names it ("cosine" is accepted for squaredcos_cap_v2)."""
    if beta_schedule == "linear":
        return linear_betas(num_timesteps, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return scaled_linear_betas(num_timesteps, beta_start, beta_end)
    if beta_schedule in ("squaredcos_cap_v2", "cosine"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete forward process of a checkpoint: β_t, ᾱ_t (float64) and how the model predicts."""

    betas: torch.Tensor
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        object.__setattr__(self, "betas", self.betas.to(F64))
        object.__setattr__(self, "alphas_cumprod", alphas_cumprod(self.betas))

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (any SD scheduler class writes these keys)."""
        num = int(config.get("num_train_timesteps", 1000))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=F64)
        else:
            betas = make_betas(
                config.get("beta_schedule", "linear"),
                num,
                float(config.get("beta_start", 0.0001)),
                float(config.get("beta_end", 0.02)),
            )
        if config.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        return cls(
            betas=betas,
            prediction_type=config.get("prediction_type", "epsilon"),
            timestep_spacing=config.get("timestep_spacing", "leading"),
            steps_offset=int(config.get("steps_offset", 0)),
            config=dict(config),
        )

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t) at timesteps t."""
        return snr(self.alphas_cumprod[torch.as_tensor(t, dtype=torch.long)])


def snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """SNR = ᾱ / (1 − ᾱ) (Kingma et al. 2021)."""
    return alpha_bar / (1.0 - alpha_bar)


def half_log_snr(alpha: float, sigma: float) -> float:
    """λ = log(α/σ) = ½ log SNR, with α = √ᾱ and σ = √(1 − ᾱ) (Lu et al. 2022, DPM-Solver eq. 3.1; +∞ at σ = 0).

    The one definition of λ: DPM-Solver++'s and UniPC's step sizes h = λ_t − λ_s and DPM-Solver++'s
    `lambda_min_clipped` all read it. Computed as log α − log σ on floats, as diffusers does.
    """
    return math.inf if sigma == 0.0 else math.log(alpha) - math.log(sigma)
