"""Samplers: DDPM (ancestral), DDIM (η) and DPM-Solver++(2M), one per file, one shared signature.

    sampler = get_sampler("dpm++", schedule)            # settings from schedule.config (+ overrides, e.g. eta=0.3)
    timesteps = sampler.timesteps(25)                     # as the diffusers scheduler's set_timesteps
    x0 = sampler(Denoiser(model_fn, schedule), x_T, timesteps, generator=g, callback=cb)

Each sampler matches its diffusers scheduler (DDPMScheduler, DDIMScheduler,
DPMSolverMultistepScheduler) built from the same config, number for number.
"""
from __future__ import annotations

from typing import Any

from ..schedules import NoiseSchedule
from .base import Denoiser, Prediction, Sampler
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverSampler

SAMPLERS: dict[str, type[Sampler]] = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpm++": DPMSolverSampler}
SAMPLER_NAMES = tuple(SAMPLERS)  # ("ddpm", "ddim", "dpm++")

__all__ = [
    "SAMPLER_NAMES", "SAMPLERS", "DDIMSampler", "DDPMSampler", "DPMSolverSampler",
    "Denoiser", "Prediction", "Sampler", "get_sampler",
]


def get_sampler(name: str, schedule: NoiseSchedule, **overrides: Any) -> Sampler:
    """The sampler called `name`, its settings read from `schedule.config` and then `overrides`."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLER_NAMES}, got {name!r}")
    return SAMPLERS[name].from_schedule(schedule, **overrides)
