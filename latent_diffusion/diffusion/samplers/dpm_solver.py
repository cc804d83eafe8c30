"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++"), data prediction, as diffusers' DPMSolverMultistepScheduler.

Notation: α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), λ_t = log(α_t/σ_t) (half log-SNR);
step i goes from s = t_i to t = t_{i+1} (after the last timestep: σ = 0, or σ_min),
h_i = λ_t − λ_s. With x̂_0 predictions m_0 (now), m_1, m_2 (earlier steps) each update is

    x_t = (σ_t/σ_s) x_s + B m_0 + K_0 (m_0 − m_1) + K_1 (m_1 − m_2),

with B, K_0, K_1 computed once per call from the λ grid (first order: K = 0).
The default for Stable Diffusion is 2M with the midpoint rule and first order
at the end (DPM++ 2M); `sigma_schedule="karras"` gives A1111's "DPM++ 2M Karras".

A tail of a plan (img2img) runs as diffusers' scheduler started at its begin index: the
"n < 15" of lower_order_final counts the whole plan (`plan_length`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch

from latent_diffusion.checks import check_choice
from latent_diffusion.diffusion.samplers.base import Run
from latent_diffusion.diffusion.samplers.sigmas import MultistepSigmaSampler
from latent_diffusion.diffusion.samplers.timesteps import solver_timesteps
from latent_diffusion.diffusion.schedules import half_log_snr


def first_order_coefficients(h: float, alpha_t: float, sigma_t: float, sigma_s: float) -> tuple[float, float]:
    """DPM-Solver++(1), the first-order exponential integrator (= DDIM, η = 0): x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D_0.

    Returns (A, B) = (σ_t/σ_s, −α_t (e^{−h} − 1)).
    """
    return sigma_t / sigma_s, -alpha_t * math.expm1(-h)  # h = +∞ (σ_t = 0): x_t = α_t D_0


def second_order_coefficient(h: float, r0: float, alpha_t: float, solver_type: str) -> float:
    """K_0 of 2M, D_1 = (m_0 − m_1)/r_0 with r_0 = h_{i−1}/h_i (DPM-Solver++ Algorithm 2).

    midpoint: x_t −= ½ α_t (e^{−h} − 1) D_1;   heun: x_t += α_t ((e^{−h} − 1)/h + 1) D_1.
    """
    if solver_type == "midpoint":
        return -0.5 * alpha_t * math.expm1(-h) / r0
    return alpha_t * (math.expm1(-h) / h + 1.0) / r0


def third_order_coefficients(h: float, r0: float, r1: float, alpha_t: float) -> tuple[float, float]:
    """K_0, K_1 of 3M (Lu et al. 2022, DPM-Solver++(3M), the multistep form of DPM-Solver-3).

    x_t += α_t φ_2 D_1 − α_t φ_3 D_2 with φ_2 = (e^{−h} − 1)/h + 1, φ_3 = (e^{−h} − 1 + h)/h² − ½.
    """
    phi_2 = math.expm1(-h) / h + 1.0
    phi_3 = (math.expm1(-h) + h) / h**2 - 0.5
    return divided_difference_weights(r0, r1, alpha_t * phi_2, -alpha_t * phi_3)


def divided_difference_weights(r0: float, r1: float, c_d1: float, c_d2: float) -> tuple[float, float]:
    """c_D1 D_1 + c_D2 D_2 written as K_0 (m_0 − m_1) + K_1 (m_1 − m_2) (DPM-Solver++ 3M's differences).

    D1_0 = (m_0 − m_1)/r_0, D1_1 = (m_1 − m_2)/r_1, D_1 = D1_0 + r_0/(r_0 + r_1)(D1_0 − D1_1),
    D_2 = (D1_0 − D1_1)/(r_0 + r_1).
    """
    k0 = c_d1 * (1.0 / r0 + 1.0 / (r0 + r1)) + c_d2 / (r0 * (r0 + r1))
    k1 = -c_d1 * r0 / (r1 * (r0 + r1)) - c_d2 / (r1 * (r0 + r1))
    return k0, k1


def step_orders(
    n: int, solver_order: int, lower_order_final: bool, euler_at_final: bool, final_zero: bool,
    plan_steps: int | None = None,
) -> list[int]:
    """The order of each of n steps: warm up from 1, and lower it at the end as diffusers does.

    The last step is first order with euler_at_final, when σ ends at 0, or (lower_order_final and N < 15);
    the one before it is at most second order with lower_order_final and N < 15, N the whole plan's
    length (`plan_steps`, default n; more for a tail).
    """
    few = lower_order_final and (plan_steps or n) < 15
    orders = []
    for i in range(n):
        if solver_order == 1 or i < 1 or (i == n - 1 and (euler_at_final or few or final_zero)):
            orders.append(1)
        elif solver_order == 2 or i < 2 or (i == n - 2 and few):
            orders.append(2)
        else:
            orders.append(3)
    return orders


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverSampler(MultistepSigmaSampler):
    """DPM-Solver++(2M) by default; settings as DPMSolverMultistepScheduler's config (its default spacing: linspace)."""

    timestep_spacing: str = "linspace"
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf

    name = "dpm++"
    unsupported = {
        "thresholding": False, "use_beta_sigmas": False, "use_lu_lambdas": False, "use_flow_sigmas": False,
        "use_dynamic_shifting": False, "variance_type": None,
    }
    algorithm_types = ("dpmsolver++",)

    def __post_init__(self):
        super().__post_init__()
        # diffusers reads DEIS's and UniPC's settings as plain DPM-Solver++ / midpoint; so do we
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        if self.algorithm_type not in self.algorithm_types:
            hint = "; for sde-dpmsolver++ use the 'dpm++_sde' sampler" if self.name == "dpm++" else ""
            raise ValueError(f"algorithm_type must be one of {self.algorithm_types} for the {self.name!r} sampler, "
                             f"got {self.algorithm_type!r}{hint}")
        check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
        check_choice("solver_order", self.solver_order, (1, 2, 3))
        check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))

    def default_plan(self, num_inference_steps: int) -> torch.Tensor:
        alphas_cumprod = self.alphas_cumprod()
        lambdas = torch.tensor([half_log_snr(math.sqrt(a), math.sqrt(1.0 - a)) for a in alphas_cumprod.tolist()],
                               dtype=alphas_cumprod.dtype)  # (T,) λ_t
        clipped = int(torch.searchsorted(lambdas.flip(0), torch.tensor([self.lambda_min_clipped], dtype=lambdas.dtype)))
        num_train = self.schedule.num_train_timesteps
        last = num_train - clipped
        steps = solver_timesteps(self.timestep_spacing, num_train, num_inference_steps, self.steps_offset, last)
        if steps.unique().numel() < steps.numel():  # λ must strictly increase along the solver's grid
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is too many for dpm++ with {self.timestep_spacing!r} "
                f"spacing over {last} timesteps: some would repeat"
            )
        return steps

    def orders(self, timesteps: torch.Tensor) -> list[int]:
        return step_orders(len(timesteps), self.solver_order, self.lower_order_final, self.euler_at_final,
                           self.final_sigmas_type == "zero", self.plan_length(timesteps))

    def coefficients(self, timesteps: torch.Tensor) -> "DPMSolverCoefficients":
        """ᾱ at each timestep and the update coefficients A = σ_t/σ_s, B, K_0, K_1 and the noise's N per step
        (float64, once per call); the per-order rules are first_order/second_order/third_order."""
        alpha_bar, alphas, sigmas, lambdas = self.grid(timesteps)
        n = len(alpha_bar)
        h = [lambdas[i + 1] - lambdas[i] for i in range(n)]
        orders = self.orders(timesteps)
        c = DPMSolverCoefficients(alpha_bar, orders, [], [], [], [], [])
        for i in range(n):
            a, b, noise = self.first_order(h[i], alphas[i + 1], sigmas[i + 1], sigmas[i])
            k0 = k1 = 0.0
            if h[i] == 0.0:  # the plan already ends at σ_min: the last step stays put
                pass
            elif orders[i] == 2:
                k0 = self.second_order(h[i], h[i - 1] / h[i], alphas[i + 1])
            elif orders[i] == 3:
                k0, k1 = self.third_order(h[i], h[i - 1] / h[i], h[i - 2] / h[i], alphas[i + 1])
            for values, value in zip((c.A, c.B, c.K0, c.K1, c.noise), (a, b, k0, k1, noise)):
                values.append(value)
        return c

    def first_order(self, h: float, alpha_t: float, sigma_t: float, sigma_s: float) -> tuple[float, float, float]:
        """A, B and the noise scale N of one step (N = 0: this solver is an ODE solver)."""
        return (*first_order_coefficients(h, alpha_t, sigma_t, sigma_s), 0.0)

    def second_order(self, h: float, r0: float, alpha_t: float) -> float:
        return second_order_coefficient(h, r0, alpha_t, self.solver_type)

    def third_order(self, h: float, r0: float, r1: float, alpha_t: float) -> tuple[float, float]:
        return third_order_coefficients(h, r0, r1, alpha_t)

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        c = run.coefficients
        m1, m2 = memory.get("m1"), memory.get("m2")  # x̂_0 of the previous two steps
        # 1. data prediction m_0 = x̂_0(x_s, s) = (x_s − σ_s ε̂)/α_s (DPM-Solver++ §3)
        m0 = run.predict(i, x).x0  # (B, C, H, W)
        # 2. first-order (exponential-integrator) part: x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) m_0
        x_next = c.A[i] * x + c.B[i] * m0
        # 3. multistep corrections from the divided differences of earlier x̂_0 (2M / 3M)
        if c.order[i] >= 2:
            x_next = x_next + c.K0[i] * (m0 - m1)
        if c.order[i] == 3:
            x_next = x_next + c.K1[i] * (m1 - m2)
        # 4. the SDE variant's fresh noise N z (the ODE draws none)
        z = self.draw_noise(run, x)
        if z is not None:
            x_next = x_next + c.noise[i] * z
        memory["m1"], memory["m2"] = m0, m1
        return x_next

    def draw_noise(self, run: Run, x: torch.Tensor) -> Optional[torch.Tensor]:
        """None: the ODE solver is deterministic (`generator` is accepted for the shared signature and unused)."""
        return None

    def _check_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        timesteps = super()._check_timesteps(timesteps)
        if (timesteps[1:] >= timesteps[:-1]).any():
            raise ValueError(f"timesteps must be strictly decreasing for the {self.name} sampler, got {timesteps.tolist()}")
        return timesteps


class DPMSolverCoefficients(NamedTuple):
    """Per-step values of the multistep update, each a list of n."""

    alpha_bar: list[float]  # ᾱ_s
    order: list[int]  # 1, 2 or 3
    A: list[float]  # coefficient of x_s
    B: list[float]  # of m_0
    K0: list[float]  # of m_0 − m_1
    K1: list[float]  # of m_1 − m_2
    noise: list[float]  # of z ~ N(0, I) (SDE variant; 0 for the ODE)
