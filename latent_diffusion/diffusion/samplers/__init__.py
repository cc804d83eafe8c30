"""Samplers, one per file, one shared signature: DDPM, DDIM, DPM-Solver++ (ODE and SDE), Euler, Euler a, Heun, UniPC,
and the few-step LCM and TCD.

    sampler = get_sampler("dpm++", schedule, sigma_schedule="karras")  # settings from schedule.config (+ overrides)
    timesteps = sampler.timesteps(25)                     # as the diffusers scheduler's set_timesteps
    x0 = sampler(Denoiser(model_fn, schedule), x_T, timesteps, generator=g, callback=cb)

    x_t = sampler.add_noise(z0, noise, timesteps[k:])      # img2img: start a tail of the plan from z0
    x0 = sampler(denoiser, x_t, timesteps[k:], generator=g)

Each sampler matches its diffusers scheduler (DDPMScheduler, DDIMScheduler,
DPMSolverMultistepScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler, UniPCMultistepScheduler, LCMScheduler, TCDScheduler) built from the same config, number for number.
x is always in VP form (the latents the network sees); the Euler family converts to σ form inside.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.diffusion.samplers.base import Denoiser, Prediction, Sampler
from latent_diffusion.diffusion.samplers.ddim import DDIMSampler
from latent_diffusion.diffusion.samplers.ddpm import DDPMSampler
from latent_diffusion.diffusion.samplers.dpm_solver import DPMSolverSampler
from latent_diffusion.diffusion.samplers.dpm_solver_sde import DPMSolverSDESampler
from latent_diffusion.diffusion.samplers.euler import EulerSampler
from latent_diffusion.diffusion.samplers.euler_ancestral import EulerAncestralSampler
from latent_diffusion.diffusion.samplers.heun import HeunSampler
from latent_diffusion.diffusion.samplers.lcm import LCMSampler
from latent_diffusion.diffusion.samplers.sigmas import EDM_SIGMA_MAX, SIGMA_SCHEDULES, VESigmaSampler
from latent_diffusion.diffusion.samplers.tcd import TCDSampler
from latent_diffusion.diffusion.samplers.unipc import UniPCSampler

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler, "ddim": DDIMSampler, "dpm++": DPMSolverSampler, "dpm++_sde": DPMSolverSDESampler,
    "euler": EulerSampler, "euler_a": EulerAncestralSampler, "heun": HeunSampler, "unipc": UniPCSampler,
    "lcm": LCMSampler, "tcd": TCDSampler,
}
SAMPLER_NAMES = tuple(SAMPLERS)
# the samplers with a stochasticity setting `eta` (DDIM's η, TCD's γ), which the pipeline's `eta` sets
ETA_SAMPLERS = tuple(name for name, cls in SAMPLERS.items() if "eta" in {f.name for f in dataclasses.fields(cls)})
# the samplers whose diffusers scheduler offers use_karras_sigmas / use_exponential_sigmas
SIGMA_SCHEDULE_SAMPLERS = tuple(
    name for name, cls in SAMPLERS.items() if "karras" in getattr(cls, "sigma_schedules", ())
)

__all__ = [
    "SAMPLER_NAMES", "SAMPLERS", "SIGMA_SCHEDULES", "SIGMA_SCHEDULE_SAMPLERS", "DDIMSampler", "DDPMSampler",
    "DPMSolverSDESampler", "DPMSolverSampler", "EulerAncestralSampler", "EulerSampler", "HeunSampler",
    "UniPCSampler", "LCMSampler", "TCDSampler", "ETA_SAMPLERS", "Denoiser", "Prediction", "Sampler",
    "check_sigma_schedule", "get_sampler", "robust_settings",
]


def check_sigma_schedule(sampler: str, sigma_schedule: Any) -> None:
    """A clear error for a σ schedule that does not exist, or that this sampler (like its diffusers scheduler) lacks."""
    if sigma_schedule is None:
        return
    if sigma_schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {sigma_schedule!r}")
    if sigma_schedule != "default" and sampler in SAMPLERS and sampler not in SIGMA_SCHEDULE_SAMPLERS:
        raise ValueError(
            f"sigma_schedule={sigma_schedule!r} is not offered by the {sampler!r} sampler; "
            f"it applies to {', '.join(SIGMA_SCHEDULE_SAMPLERS)}"
        )


def get_sampler(name: str, schedule: NoiseSchedule, **overrides: Any) -> Sampler:
    """The sampler called `name`, its settings read from `schedule.config` and then `overrides`.

    `sigma_schedule` ("default", "karras", "exponential"; None: the config's use_karras_sigmas /
    use_exponential_sigmas) is accepted by every sampler and refused by name where it does not apply.
    """
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {name!r}")
    if "sigma_schedule" in overrides:
        check_sigma_schedule(name, overrides["sigma_schedule"])
        if overrides["sigma_schedule"] is None or name not in SIGMA_SCHEDULE_SAMPLERS:
            overrides = {k: v for k, v in overrides.items() if k != "sigma_schedule"}
    return SAMPLERS[name].from_schedule(schedule, **overrides)


def robust_settings(name: str) -> dict[str, Any]:
    """The settings the pipeline adds to diffusers' for `name`: the Euler family starts no higher than σ = 80.

    A no-op for schedules whose σ_max is below 80 (SD's ≈ 14.6: diffusers' numbers exactly); for the cosine
    betas of the embedded default (σ_max ≈ 2·10⁴) it is what keeps Heun from drawing noise.
    """
    return {"sigma_max_limit": EDM_SIGMA_MAX} if issubclass(SAMPLERS[name], VESigmaSampler) else {}
