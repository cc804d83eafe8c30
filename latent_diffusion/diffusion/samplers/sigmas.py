"""The σ view of the schedule and the σ schedules (Karras, exponential) that diffusers' samplers offer.

σ_t = √((1 − ᾱ_t)/ᾱ_t) is the noise level of the variance-exploding form of the
same process: x_VE = x_VP / √ᾱ_t = x_0 + σ_t ε (Karras et al. 2022, "EDM",
§2 and Table 1: s(t) = √ᾱ_t, σ(t) = σ_t). Our samplers keep x in VP form (the
latents the network sees); the Euler family steps in VE form and converts on
the way in and out.

A σ schedule replaces the plan's noise levels: "karras" ρ = 7 (EDM eq. 5),
"exponential" (evenly spaced in log σ). Their timesteps are fractional: the
point between two training timesteps whose log σ interpolates linearly to the
wanted σ (diffusers' `_sigma_to_t`). The plan keeps those fractional timesteps
in float64, so σ is recovered from a plan, or from any tail of it, exactly;
what the network is given (the fractional t as float32, or t rounded) is each
sampler's `model_timesteps`, as its diffusers scheduler does it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import numpy as np
import torch

from latent_diffusion.checks import check_choice
from latent_diffusion.diffusion.gaussian import q_sample
from latent_diffusion.diffusion.schedules import half_log_snr
from latent_diffusion.tensors import append_dims
from latent_diffusion.diffusion.samplers.base import Sampler, check_timestep_range
from latent_diffusion.diffusion.samplers.timesteps import euler_timesteps

SIGMA_SCHEDULES = ("default", "karras", "exponential")
ZERO_SNR_ALPHA_BAR = 2.0**-24  # ᾱ_T = 0 has σ_T = ∞; diffusers' σ schedulers use 2⁻²⁴ instead
KARRAS_RHO = 7.0  # EDM's ρ, as diffusers
EDM_SIGMA_MAX = 80.0  # the top noise level of EDM's own plans (Karras et al. 2022, Table 1)


def clamp_zero_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ᾱ_t (float64) with a zero terminal ᾱ_T raised to 2⁻²⁴, so that σ_T and λ_T are finite (as diffusers)."""
    if alphas_cumprod[-1] == 0:
        alphas_cumprod = alphas_cumprod.clone()
        alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR
    return alphas_cumprod


def ve_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for t = 0..T−1 (EDM Table 1, VP row), float64, increasing."""
    ab = alphas_cumprod.double().numpy()
    return np.sqrt((1.0 - ab) / ab)


def alpha_bar_from_sigma(sigma: np.ndarray) -> np.ndarray:
    """ᾱ = 1 / (1 + σ²), the inverse of `ve_sigmas`."""
    return 1.0 / (1.0 + np.asarray(sigma, dtype=np.float64) ** 2)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..n−1 (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """n noise levels evenly spaced in log σ from σ_max down to σ_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_schedule_levels(sigma_schedule: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The n descending noise levels of a Karras or exponential schedule."""
    if sigma_schedule == "karras":
        return karras_sigmas(sigma_min, sigma_max, n)
    if sigma_schedule == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, n)
    raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES[1:]} here, got {sigma_schedule!r}")


def limit_plan_sigma(timesteps: torch.Tensor, table: np.ndarray, sigma_max: float) -> torch.Tensor:
    """A plan that starts no higher than σ = sigma_max: its timesteps above t* dropped and t* put first.

    t* is the highest training timestep with σ_t <= sigma_max. A plan that already starts at or below t*
    is returned unchanged, so a schedule whose σ_max is under the limit (SD's ≈ 14.6) keeps diffusers'
    plan exactly. The cosine betas reach σ_{T−1} ≈ 2·10⁴: Heun's averaged slope multiplies the network's
    error by ≈ σ_0/σ_1 on its first step, and the VE form works on x·σ_max in float32.
    """
    below = np.nonzero(table <= sigma_max)[0]
    if len(below) == 0:
        raise ValueError(f"sigma_max_limit must be at least σ_0 = {table[0]:.4g} of this schedule, got {sigma_max}")
    top = float(below[-1])
    if timesteps[0] <= top:
        return timesteps
    kept = timesteps[timesteps < top]
    return torch.cat([torch.tensor([top], dtype=timesteps.dtype), kept])


def sigma_to_t(sigmas: np.ndarray, table: np.ndarray) -> np.ndarray:
    """The fractional timestep of each σ: log σ interpolated linearly between training timesteps (diffusers' _sigma_to_t)."""
    log_table = np.log(table)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    return np.interp(log_sigma, log_table, np.arange(len(table), dtype=np.float64))


def sigmas_at(timesteps: torch.Tensor, table: np.ndarray, log_interpolation: bool) -> np.ndarray:
    """σ at (possibly fractional) timesteps: σ_t itself at integers, interpolated between them.

    Linearly in σ for the default plans (diffusers' `np.interp` of sigmas), in log σ for Karras and
    exponential plans (the exact inverse of `sigma_to_t`).
    """
    t = timesteps.double().numpy()
    grid = np.arange(len(table), dtype=np.float64)
    if log_interpolation:
        return np.exp(np.interp(t, grid, np.log(table)))
    return np.interp(t, grid, table)


@dataclasses.dataclass(frozen=True, eq=False)
class SigmaScheduleSampler(Sampler):
    """Base of the samplers whose plan may follow a σ schedule (`sigma_schedule`: default, karras, exponential).

    The config flags `use_karras_sigmas` / `use_exponential_sigmas` select it, as in diffusers;
    the `sigma_schedule` setting overrides them.
    """

    sigma_schedule: str = "default"

    fractional_plan: ClassVar[bool] = True  # whether the default plan may visit fractional timesteps
    sigma_schedules: ClassVar[tuple[str, ...]] = SIGMA_SCHEDULES  # what its diffusers scheduler offers

    def __post_init__(self):
        super().__post_init__()
        check_choice("sigma_schedule", self.sigma_schedule, SIGMA_SCHEDULES)
        if self.sigma_schedule not in self.sigma_schedules:
            raise ValueError(f"sigma_schedule={self.sigma_schedule!r} is not offered by the {self.name!r} sampler "
                             f"(only {self.sigma_schedules}), as by its diffusers scheduler")

    @classmethod
    def settings_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        if cls.sigma_schedules == ("default",):  # its diffusers scheduler has no such flags and ignores them
            return {}
        karras, exponential = bool(config.get("use_karras_sigmas")), bool(config.get("use_exponential_sigmas"))
        if karras and exponential:
            raise ValueError("scheduler config sets both use_karras_sigmas and use_exponential_sigmas; choose one")
        return {"sigma_schedule": "karras" if karras else "exponential" if exponential else "default"}

    def alphas_cumprod(self) -> torch.Tensor:
        """The schedule's ᾱ_t (float64), with a zero terminal ᾱ_T raised to 2⁻²⁴."""
        return clamp_zero_snr(self.schedule.alphas_cumprod)

    def sigma_table(self) -> np.ndarray:
        """σ_t at the T training timesteps (float64)."""
        return ve_sigmas(self.alphas_cumprod())

    def plan_sigmas(self, timesteps: torch.Tensor) -> np.ndarray:
        """σ at each timestep of a plan (n,), float64."""
        if not timesteps.is_floating_point():
            return self.sigma_table()[timesteps.numpy()]
        return sigmas_at(timesteps, self.sigma_table(), log_interpolation=self.sigma_schedule != "default")

    def plan_alpha_bars(self, timesteps: torch.Tensor) -> list[float]:
        """ᾱ at each timestep of a plan: looked up at integer timesteps, from σ between them."""
        if not timesteps.is_floating_point():
            return self.alphas_cumprod()[timesteps].tolist()
        return alpha_bar_from_sigma(self.plan_sigmas(timesteps)).tolist()

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x at timesteps[0] for a run that starts there: q(x_t | x_0) with ᾱ of the plan's σ there (Ho et al. 2020 eq. 4).

        The same x as diffusers' `add_noise` at the scheduler's begin index (in VP form: x_VE / √(1 + σ²)).
        """
        t = self._check_timesteps(timesteps)[:1]
        alpha_bar = torch.tensor(self.plan_alpha_bars(t), dtype=z0.dtype, device=z0.device)  # (1,)
        return q_sample(z0, noise, append_dims(alpha_bar, z0.ndim))

    def _check_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The plan on the CPU: float64 where it may be fractional (σ schedules), else long; 1-D, inside [0, T)."""
        timesteps = torch.as_tensor(timesteps).to("cpu")
        fractional = timesteps.is_floating_point() and bool((timesteps != timesteps.round()).any())
        if fractional and not (self.fractional_plan or self.sigma_schedule != "default"):
            raise ValueError(f"timesteps must be integers for {self.name!r} with the default sigma_schedule, "
                             f"got {timesteps.tolist()}")
        timesteps = timesteps.double() if fractional or self.fractional_plan else timesteps.long()
        check_timestep_range(timesteps, self.schedule.num_train_timesteps)
        return timesteps


@dataclasses.dataclass(frozen=True, eq=False)
class MultistepSigmaSampler(SigmaScheduleSampler):
    """Base of the VP multistep solvers (DPM-Solver++, UniPC): integer plans by default, σ schedules over all of [σ_0, σ_{T−1}].

    With a σ schedule the network is given the plan's timestep rounded (truncated for the cosine
    betas and for exponential σ), while the update uses the schedule's own σ: as diffusers does.
    """

    fractional_plan = False
    rounds_cosine_karras: ClassVar[bool] = False  # DPMSolverMultistepScheduler truncates there, UniPC rounds

    def default_plan(self, num_inference_steps: int) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, num_inference_steps: int) -> torch.Tensor:
        if self.sigma_schedule == "default":
            return self.default_plan(num_inference_steps)
        table = self.sigma_table()
        levels = sigma_schedule_levels(self.sigma_schedule, table[0], table[-1], num_inference_steps)
        return torch.from_numpy(sigma_to_t(levels, table))  # (n,) float64, descending

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        if not timesteps.is_floating_point():
            return timesteps
        cosine = self.schedule.config.get("beta_schedule") == "squaredcos_cap_v2"
        rounds = self.sigma_schedule == "karras" and (self.rounds_cosine_karras or not cosine)
        return (timesteps.round() if rounds else timesteps.floor()).long()

    def grid(self, timesteps: torch.Tensor) -> tuple[list[float], list[float], list[float], list[float]]:
        """ᾱ at the n timesteps, and α, σ, λ at them and at the end (σ = 0, or σ_min): float64 lists."""
        alpha_bar = self.plan_alpha_bars(timesteps)  # (n,)
        final = 1.0 if getattr(self, "final_sigmas_type", "zero") == "zero" else self.schedule.alphas_cumprod[0].item()
        alphas = [math.sqrt(a) for a in alpha_bar + [final]]  # α at the n timesteps and the end
        sigmas = [math.sqrt(1.0 - a) for a in alpha_bar + [final]]
        lambdas = [half_log_snr(a, s) for a, s in zip(alphas, sigmas)]  # λ = log(α/σ)
        return alpha_bar, alphas, sigmas, lambdas


class VECoefficients(NamedTuple):
    """Per-step values of the Euler family: σ at the n timesteps and the end, and the VP↔VE scales."""

    alpha_bar: list[float]  # ᾱ_i = 1/(1 + σ_i²), i < n
    sigma: list[float]  # σ_0..σ_n (σ_n = 0)
    scale: list[float]  # √(1 + σ_i²) = 1/√ᾱ_i, i ≤ n: x_VE = scale · x_VP


@dataclasses.dataclass(frozen=True, eq=False)
class VESigmaSampler(SigmaScheduleSampler):
    """Base of the Euler family (Karras et al. 2022, Algorithms 1–2; k-diffusion): steps in σ on x_VE = x_VP/√ᾱ.

    Plans as EulerDiscreteScheduler's (float timesteps, default spacing linspace); σ schedules take
    σ_min, σ_max from the plan's own first and last σ; the network gets t as float32, as diffusers
    gives it. The plan ends at σ = 0. `sigma_max_limit` (None: as diffusers) starts the plan no higher
    than that σ (`limit_plan_sigma`), before any σ schedule is applied.
    """

    timestep_spacing: str = "linspace"
    sigma_max_limit: Optional[float] = None

    def plan(self, num_inference_steps: int) -> torch.Tensor:
        num_train = self.schedule.num_train_timesteps
        timesteps = euler_timesteps(self.timestep_spacing, num_train, num_inference_steps, self.steps_offset)
        if self.sigma_max_limit is not None:
            timesteps = limit_plan_sigma(timesteps, self.sigma_table(), self.sigma_max_limit)
        if self.sigma_schedule == "default":
            return timesteps
        table = self.sigma_table()
        sigmas = sigmas_at(timesteps, table, log_interpolation=False)
        levels = sigma_schedule_levels(self.sigma_schedule, sigmas[-1], sigmas[0], num_inference_steps)
        return torch.from_numpy(sigma_to_t(levels, table))  # (n,) float64, fractional

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float()

    def coefficients(self, timesteps: torch.Tensor) -> VECoefficients:
        sigma = self.plan_sigmas(timesteps).tolist() + [0.0]  # (n + 1,)
        return VECoefficients(alpha_bar_from_sigma(sigma[:-1]).tolist(), sigma, [math.sqrt(1.0 + s * s) for s in sigma])

    def start_from_noise(self, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x at timesteps[0] from ε ~ N(0, I) as diffusers starts: x_VE = init_noise_sigma · ε, here in VP form.

        init_noise_sigma is σ_max for linspace and trailing spacing and √(σ_max² + 1) for leading.
        """
        sigma_max = float(self.plan_sigmas(self._check_timesteps(timesteps)[:1])[0])
        init = math.sqrt(sigma_max**2 + 1.0) if self.timestep_spacing == "leading" else sigma_max
        return noise * (init / math.sqrt(sigma_max**2 + 1.0))


def to_d(x_ve: torch.Tensor, sigma: float, x0: torch.Tensor) -> torch.Tensor:
    """dx/dσ = (x − D(x; σ))/σ of the probability-flow ODE (Karras et al. 2022, eq. 3 with s = 1; k-diffusion `to_d`)."""
    return (x_ve - x0) / sigma
