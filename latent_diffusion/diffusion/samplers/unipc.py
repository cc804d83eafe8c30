"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), as diffusers' UniPCMultistepScheduler.

Data prediction (predict_x0), B(h) = e^{−h} − 1 ("bh2", the default) or −h ("bh1"). Step i goes
from s = t_i to t = t_{i+1}, h = λ_t − λ_s:

1. UniC (corrector, Algorithm 2), for i ≥ 1: with m_i = x̂_0(x_i) now known, x_i is re-estimated
   from x_{i−1} with the model outputs up to m_i, at the order used to reach it (eq. 8 and 15);
   the network is not called again: m_i stays the one evaluated at the uncorrected x_i.
2. UniP (predictor, eq. 6 and 14) of order p: x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) m_0
   − α_t B(h) Σ_k ρ_k D_k, D_k = (m_{−k} − m_0)/r_k, r_k = (λ_{s−k} − λ_s)/h.

The ρ solve the order conditions R ρ = b with R_{jk} = r_k^{j−1}, b_j = j! φ_{j+1}(h) h / B(h)
(φ by the recursion φ_{k+1} = (φ_k − 1/k!)/h); all coefficients are computed once per call.
Orders warm up from 1 and, with lower_order_final, fall to the steps left; since that counts
steps to the end, a tail of a plan (img2img) runs exactly as diffusers' scheduler started there.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch

from latent_diffusion.checks import check_choice
from latent_diffusion.diffusion.samplers.base import Run
from latent_diffusion.diffusion.samplers.sigmas import MultistepSigmaSampler
from latent_diffusion.diffusion.samplers.timesteps import solver_timesteps


def unipc_order_conditions(rks: list[float], hh: float, B_h: float) -> tuple[np.ndarray, np.ndarray]:
    """R (p, p) with rows r^{j−1} and b (p,) with b_j = h φ_j-terms · j!/B(h), for hh = −h (UniPC eq. 14–15)."""
    p = len(rks)
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1.0
    R, b = [], []
    for j in range(1, p + 1):
        R.append([r ** (j - 1) for r in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.array(R), np.array(b)


def b_of_h(hh: float, solver_type: str) -> float:
    """B(h): −h for "bh1", e^{−h} − 1 for "bh2" (UniPC §3.3), with hh = −h."""
    return hh if solver_type == "bh1" else math.expm1(hh)


def predictor_weights(lambdas: list[float], i: int, order: int, alpha_t: float, solver_type: str) -> list[float]:
    """UniP-p from s = t_i: the weights of m_i, m_{i−1}, ..., m_{i−p+1} (x_s's is σ_t/σ_s)."""
    h = lambdas[i + 1] - lambdas[i]
    hh = -h
    h_phi_1 = math.expm1(hh)
    rks = [(lambdas[i - k] - lambdas[i]) / h for k in range(1, order)]
    weights = [-alpha_t * h_phi_1] + [0.0] * (order - 1)
    if order >= 2:
        B_h = b_of_h(hh, solver_type)
        R, b = unipc_order_conditions(rks + [1.0], hh, B_h)
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        for k, (rho, r) in enumerate(zip(rhos, rks), start=1):  # − α_t B(h) ρ_k (m_{−k} − m_0)/r_k
            weights[k] -= alpha_t * B_h * rho / r
            weights[0] += alpha_t * B_h * rho / r
    return weights


def corrector_weights(lambdas: list[float], i: int, order: int, alpha_t: float, solver_type: str) -> list[float]:
    """UniC-p for the step t_{i−1} -> t_i: the weights of m_i (at the uncorrected x_i), m_{i−1}, ..., m_{i−p}."""
    h = lambdas[i] - lambdas[i - 1]
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = b_of_h(hh, solver_type)
    rks = [(lambdas[i - 1 - k] - lambdas[i - 1]) / h for k in range(1, order)]
    R, b = unipc_order_conditions(rks + [1.0], hh, B_h)
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    # x_i = (σ_i/σ_{i−1}) x_{i−1} − α_i (e^{−h} − 1) m_{i−1} − α_i B(h) (Σ_k ρ_k D_k + ρ_p (m_i − m_{i−1}))
    weights = [-alpha_t * B_h * rhos[-1], -alpha_t * h_phi_1 + alpha_t * B_h * rhos[-1]] + [0.0] * (order - 1)
    for k, (rho, r) in enumerate(zip(rhos[:-1], rks), start=1):
        weights[k + 1] -= alpha_t * B_h * rho / r
        weights[1] += alpha_t * B_h * rho / r
    return weights


def unipc_orders(n: int, solver_order: int, lower_order_final: bool) -> list[int]:
    """Order of each predictor step: warm-up min(i + 1, ·), and at most the steps left with lower_order_final."""
    return [min(solver_order, n - i if lower_order_final else solver_order, i + 1) for i in range(n)]


class UniPCCoefficients(NamedTuple):
    """Per-step values of UniPC, each a list of n."""

    alpha_bar: list[float]  # ᾱ_i
    order: list[int]  # predictor order p_i
    ratio: list[float]  # σ_{i+1}/σ_i, the weight of x_i in the predictor
    predictor: list[list[float]]  # weights of m_i, m_{i−1}, ...
    corrector: list[list[float]]  # weights of m_i, m_{i−1}, ... for x_i's correction (empty at i = 0)


@dataclasses.dataclass(frozen=True, eq=False)
class UniPCSampler(MultistepSigmaSampler):
    """UniPC-bh2 of order 2 by default; settings as UniPCMultistepScheduler's config (default spacing linspace)."""

    timestep_spacing: str = "linspace"
    solver_order: int = 2
    solver_type: str = "bh2"
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"

    name = "unipc"
    rounds_cosine_karras = True
    unsupported = {
        "predict_x0": True, "thresholding": False, "disable_corrector": [], "solver_p": None,
        "use_beta_sigmas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
        "sigma_min": None, "sigma_max": None,
    }

    def __post_init__(self):
        super().__post_init__()
        check_choice("solver_type", self.solver_type, ("bh1", "bh2"))
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))

    def default_plan(self, num_inference_steps: int) -> torch.Tensor:
        num_train = self.schedule.num_train_timesteps
        return solver_timesteps(self.timestep_spacing, num_train, num_inference_steps, self.steps_offset)

    def coefficients(self, timesteps: torch.Tensor) -> UniPCCoefficients:
        alpha_bar, alphas, sigmas, lambdas = self.grid(timesteps)
        n = len(alpha_bar)
        orders = unipc_orders(n, self.solver_order, self.lower_order_final)
        ratio = [sigmas[i + 1] / sigmas[i] for i in range(n)]
        predictor = [predictor_weights(lambdas, i, orders[i], alphas[i + 1], self.solver_type) for i in range(n)]
        corrector = [[]] + [corrector_weights(lambdas, i, orders[i - 1], alphas[i], self.solver_type)
                            for i in range(1, n)]
        return UniPCCoefficients(alpha_bar, orders, ratio, predictor, corrector)

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c = run.coefficients
        history = memory.setdefault("m", [])  # x̂_0 of earlier steps, newest first
        # 1. m_i = x̂_0(x_i) at the predictor's x_i (UniPC eq. 14's model evaluation)
        m = run.predict(i, x).x0  # (B, C, H, W)
        # 2. UniC: x_i re-estimated from x_{i−1} with m_i (eq. 15), for i ≥ 1
        if i > 0:
            w = c.corrector[i]
            x = c.ratio[i - 1] * memory["x_prev"] + sum(wk * mk for wk, mk in zip(w, [m] + history))
        history.insert(0, m)
        del history[self.solver_order:]
        memory["x_prev"] = x
        # 3. UniP of order p_i from x_i to x_{i+1} (eq. 14)
        w = c.predictor[i]
        return c.ratio[i] * x + sum(wk * mk for wk, mk in zip(w, history))
