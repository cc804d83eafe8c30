"""The settings an evaluation samples with: (sampler, steps, guidance), as a grid or as paired lists.

Every list is checked before any model is loaded; errors name the parameter (`EvalArgumentError`).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from latent_diffusion.diffusion.samplers import SAMPLER_NAMES
from latent_diffusion.evaluation.errors import EvalArgumentError


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of sampling: sampler name, number of steps, classifier-free guidance scale."""

    sampler: str
    steps: int
    guidance: float

    @property
    def name(self) -> str:
        """Folder and file name: "dpmpp-20-w7.5"."""
        return f"{self.sampler.replace('+', 'p')}-{self.steps}-w{self.guidance:g}"

    @property
    def label(self) -> str:
        return f"{self.sampler} {self.steps} steps, w={self.guidance:g}"

    def as_dict(self) -> dict:
        return dict(name=self.name, sampler=self.sampler, steps=self.steps, guidance=self.guidance)


def check_samplers(samplers: Iterable[str], argument: str = "samplers") -> list[str]:
    samplers = list(samplers)
    unknown = [s for s in samplers if s not in SAMPLER_NAMES]
    if unknown or not samplers:
        raise EvalArgumentError(argument, f"names unknown sampler(s) {unknown}; choose from {', '.join(SAMPLER_NAMES)}")
    return samplers


def check_steps(steps: Iterable[int], argument: str = "steps") -> list[int]:
    steps = list(steps)
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad or not steps:
        raise EvalArgumentError(argument, f"step counts must be integers >= 1; got {bad or steps}")
    return steps


def check_guidance(guidance: Iterable[float], argument: str = "guidance") -> list[float]:
    guidance = [float(g) for g in guidance]
    bad = [g for g in guidance if not g >= 0]
    if bad or not guidance:
        raise EvalArgumentError(argument, f"guidance scales must be >= 0; got {bad or guidance}")
    return guidance


def parse_sampler_steps(spec: str, argument: str = "pairs") -> tuple[str, list[int]]:
    """"ddpm:1000,250,50" -> ("ddpm", [1000, 250, 50])."""
    sampler, colon, steps = spec.partition(":")
    if not colon or not steps:
        raise EvalArgumentError(argument, f"expects SAMPLER:STEPS[,STEPS...] such as ddim:50,20; got {spec!r}")
    check_samplers([sampler], argument)
    try:
        counts = [int(s) for s in steps.split(",")]
    except ValueError:
        raise EvalArgumentError(argument, f"step counts in {spec!r} must be integers") from None
    return sampler, check_steps(counts, argument)


@dataclasses.dataclass(frozen=True)
class SettingsRequest:
    """The settings asked for, checked before any model is loaded; None fields take the model's defaults.

    Either a grid (samplers × steps × guidance) or paired lists (sampler:steps...) × guidance.
    """

    samplers: Optional[tuple[str, ...]] = None
    steps: Optional[tuple[int, ...]] = None
    guidance: Optional[tuple[float, ...]] = None
    pairs: Optional[tuple[tuple[str, tuple[int, ...]], ...]] = None

    @classmethod
    def from_lists(cls, samplers=None, steps=None, guidance=None, pairs=None) -> "SettingsRequest":
        """Check each list (errors name its parameter); `pairs` are "sampler:steps,steps" strings."""
        if pairs and (samplers or steps):
            raise EvalArgumentError("pairs", "(sampler:steps lists) cannot be combined with sampler or step lists")
        return cls(
            samplers=tuple(check_samplers(samplers)) if samplers is not None else None,
            steps=tuple(check_steps(steps)) if steps is not None else None,
            guidance=tuple(check_guidance(guidance)) if guidance is not None else None,
            pairs=tuple((s, tuple(n)) for s, n in map(parse_sampler_steps, pairs)) if pairs else None,
        )

    def settings(self, defaults: dict) -> list[Setting]:
        """The settings, in order, duplicates dropped; `defaults` holds sampler, num_inference_steps, guidance_scale."""
        guidance = self.guidance or (float(defaults["guidance_scale"]),)
        if self.pairs:
            sampler_steps = [(s, n) for s, counts in self.pairs for n in counts]
        else:
            samplers = self.samplers or (defaults["sampler"],)
            steps = self.steps or (int(defaults["num_inference_steps"]),)
            sampler_steps = [(s, n) for s in samplers for n in steps]
        settings = [Setting(s, n, g) for s, n in sampler_steps for g in guidance]
        return list(dict.fromkeys(settings))
