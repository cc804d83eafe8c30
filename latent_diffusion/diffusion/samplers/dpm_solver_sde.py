"""SDE-DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", §4 and App. B: the SDE solver), as diffusers'
DPMSolverMultistepScheduler with algorithm_type="sde-dpmsolver++": A1111's "DPM++ 2M SDE" ("... Karras" with
sigma_schedule="karras").

The variance-preserving SDE's exact solution over a step h = λ_t − λ_s in data prediction: with x̂_0
predictions m_0 (now) and m_1, m_2 (earlier steps),

    x_t = (σ_t/σ_s) e^{−h} x_s + α_t (1 − e^{−2h}) m_0 + K_0 (m_0 − m_1) + K_1 (m_1 − m_2) + σ_t √(1 − e^{−2h}) z,

z ~ N(0, I) fresh at every step, the last one too (where σ_t = 0). The noise is drawn in float32 from
the caller's generator with x's shape, exactly as diffusers' `randn_tensor(..., dtype=torch.float32)`,
so a seed gives diffusers' image. Plan, orders and settings are DPM-Solver++'s (`dpm_solver.py`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

from latent_diffusion.tensors import randn
from latent_diffusion.diffusion.samplers.base import Run
from latent_diffusion.diffusion.samplers.dpm_solver import DPMSolverSampler, divided_difference_weights


def sde_first_order_coefficients(h: float, alpha_t: float, sigma_t: float, sigma_s: float) -> tuple[float, float, float]:
    """SDE-DPM-Solver++(1): x_t = (σ_t/σ_s) e^{−h} x_s + α_t (1 − e^{−2h}) D_0 + σ_t √(1 − e^{−2h}) z.

    Returns (A, B, N), the coefficients of x_s, D_0 and z; h = +∞ (σ_t = 0) gives x_t = α_t D_0.
    """
    one_minus = -math.expm1(-2.0 * h)  # 1 − e^{−2h}
    return sigma_t / sigma_s * math.exp(-h), alpha_t * one_minus, sigma_t * math.sqrt(one_minus)


def sde_second_order_coefficient(h: float, r0: float, alpha_t: float, solver_type: str) -> float:
    """K_0 of SDE-DPM-Solver++(2M), D_1 = (m_0 − m_1)/r_0.

    midpoint: x_t += ½ α_t (1 − e^{−2h}) D_1;   heun: x_t += α_t ((1 − e^{−2h})/(−2h) + 1) D_1.
    """
    if solver_type == "midpoint":
        return -0.5 * alpha_t * math.expm1(-2.0 * h) / r0
    return alpha_t * (math.expm1(-2.0 * h) / (2.0 * h) + 1.0) / r0


def sde_third_order_coefficients(h: float, r0: float, r1: float, alpha_t: float) -> tuple[float, float]:
    """K_0, K_1 of SDE-DPM-Solver++(3M): x_t += α_t ((1 − e^{−2h})/(−2h) + 1) D_1 + α_t ((1 − e^{−2h} − 2h)/(2h)² − ½) D_2."""
    c_d1 = alpha_t * (math.expm1(-2.0 * h) / (2.0 * h) + 1.0)
    c_d2 = alpha_t * ((-math.expm1(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    return divided_difference_weights(r0, r1, c_d1, c_d2)


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverSDESampler(DPMSolverSampler):
    """SDE-DPM-Solver++(2M) by default; DPMSolverMultistepScheduler's settings, algorithm_type fixed by the name."""

    algorithm_type: str = "sde-dpmsolver++"

    name = "dpm++_sde"
    algorithm_types = ("sde-dpmsolver++",)

    @classmethod
    def settings_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """A checkpoint's algorithm_type (usually dpmsolver++) names another sampler: this one is always the SDE."""
        return {**super().settings_from_config(config), "algorithm_type": "sde-dpmsolver++"}

    def first_order(self, h: float, alpha_t: float, sigma_t: float, sigma_s: float) -> tuple[float, float, float]:
        return sde_first_order_coefficients(h, alpha_t, sigma_t, sigma_s)

    def second_order(self, h: float, r0: float, alpha_t: float) -> float:
        return sde_second_order_coefficient(h, r0, alpha_t, self.solver_type)

    def third_order(self, h: float, r0: float, r1: float, alpha_t: float) -> tuple[float, float]:
        return sde_third_order_coefficients(h, r0, r1, alpha_t)

    def draw_noise(self, run: Run, x: torch.Tensor) -> torch.Tensor:
        """z ~ N(0, I) of x's shape, drawn at every step (also where N = 0, so the generator advances as diffusers'),
        in float32 as diffusers draws it, then cast to x's dtype."""
        return randn(x.shape, run.generator, torch.float32, x.device).to(x.dtype)
