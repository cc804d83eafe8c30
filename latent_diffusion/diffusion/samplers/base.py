"""What every sampler shares: the `Denoiser` adapter, the `Sampler` base, and settings read from a scheduler config.

A sampler is a small frozen dataclass. The base owns the call's prologue and
loop (check the timesteps, compute the per-step coefficients once, keep x_t
in a working dtype, call the callback after each step); a sampler adds only
its plan (`plan`), its coefficients (`coefficients`, a NamedTuple) and its
update rule (`step`). Its settings are the keys of the
diffusers scheduler it mirrors (`clip_sample`, `set_alpha_to_one`, ...), read
from the checkpoint's `scheduler_config.json` with that scheduler class's
defaults, so `get_sampler("ddim", schedule)` samples exactly as
`DDIMScheduler.from_config(config)` does. Sampling never changes the sampler:
all per-call state lives in local variables, so one sampler can run many
calls, even at once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional, Sequence, Union

import torch

from latent_diffusion.checks import check_choice
from latent_diffusion.diffusion.gaussian import predictions_from_output, q_sample
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.tensors import gather
from latent_diffusion.diffusion.samplers.timesteps import SPACINGS, check_num_inference_steps, spaced_timesteps

Generator = Union[torch.Generator, Sequence[torch.Generator], None]
Callback = Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Prediction(NamedTuple):
    """What a sampler asks of the network at (x_t, t): the noise ε̂ and the clean sample x̂_0, each (B, C, H, W)."""

    eps: torch.Tensor
    x0: torch.Tensor


class Denoiser:
    """Turns a network that predicts ε, v or x_0 (per `schedule.prediction_type`) into (ε̂, x̂_0) for the samplers.

    `model_fn(x_t, t)` returns the raw network output; `t` is a 0-dim tensor: long, or float32 for the
    samplers whose plan visits fractional timesteps (Karras σ with Euler/Heun, as diffusers).
    Samplers pass the ᾱ_t they precomputed for the step (`alpha_bar`), which also
    lets a sampler use its own view of the schedule (DPM-Solver++ clamps ᾱ_T = 0 to
    2⁻²⁴); without it ᾱ_t is looked up in the schedule.
    """

    def __init__(self, model_fn: ModelFn, schedule: NoiseSchedule):
        self.model_fn = model_fn
        self.schedule = schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, alpha_bar: Optional[torch.Tensor] = None) -> Prediction:
        if alpha_bar is None:
            alpha_bar = gather(self.schedule.alphas_cumprod, t, x_t)  # (1, 1, 1, 1) or (B, 1, 1, 1)
        output = self.model_fn(x_t, t)  # (B, C, H, W): ε, v or x_0
        eps, x0 = predictions_from_output(output, x_t, alpha_bar, self.schedule.prediction_type)
        return Prediction(eps=eps, x0=x0)


def reject_config(config: Mapping[str, Any], sampler: str, unsupported: Mapping[str, Any]) -> None:
    """Raise for config keys set to a value (other than the harmless default) that this sampler does not implement."""
    for key, harmless in unsupported.items():
        if key in config and config[key] not in (harmless, None):
            raise ValueError(
                f"scheduler config {key}={config[key]!r} is not supported by the {sampler!r} sampler "
                f"(only {harmless!r}); remove it from the config or choose another sampler"
            )


class Run(NamedTuple):
    """What one call fixes before its loop: the network, the plan on x's device and the per-step coefficients."""

    denoiser: Denoiser
    timesteps: torch.Tensor  # (n,) the plan, as given
    model_timesteps: torch.Tensor  # (n,) what the network is called with at each step
    alpha_bar: torch.Tensor  # (n,) ᾱ at each step, in x's dtype
    coefficients: Any  # the sampler's NamedTuple of per-step values
    generator: Generator

    def predict(self, i: int, x: torch.Tensor) -> Prediction:
        """(ε̂, x̂_0) of the network at step i's timestep, x (B, C, H, W)."""
        return self.denoiser(x, self.model_timesteps[i], self.alpha_bar[i])


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """Base of the samplers: settings as dataclass fields, `timesteps(n)` and `__call__(denoiser, x_T, timesteps)`.

    Subclasses set `name`, `unsupported` (config key -> the only value accepted)
    and, as field defaults, their diffusers class's defaults (`timestep_spacing` too);
    they implement `coefficients(timesteps)` (a NamedTuple with an `alpha_bar`
    field) and `step(run, i, x, memory)`, and `plan(n)` where their timesteps differ
    from DDPMScheduler's.
    """

    schedule: NoiseSchedule = dataclasses.field(repr=False)
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    name: ClassVar[str] = ""
    unsupported: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self):
        check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule, **overrides: Any) -> "Sampler":
        """Settings from `schedule.config` (this class's defaults where a key is missing), then `overrides`."""
        settings = [f for f in dataclasses.fields(cls) if f.name != "schedule"]
        names = [f.name for f in settings]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown setting(s) {unknown} for sampler {cls.name!r}; allowed: {names}")
        config = schedule.config
        reject_config(config, cls.name, cls.unsupported)
        values = {f.name: f.default if config.get(f.name) is None else config[f.name] for f in settings}
        default_spacing = next(f.default for f in settings if f.name == "timestep_spacing")
        values["timestep_spacing"] = _spacing(schedule, default_spacing)
        values["steps_offset"] = schedule.steps_offset
        values.update(cls.settings_from_config(config))
        values.update(overrides)
        return cls(schedule=schedule, **values)

    @classmethod
    def settings_from_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Settings that are not config keys of the same name (none here; the σ-schedule samplers read two flags)."""
        return {}

    # ----- the plan ---------------------------------------------------------------------------------------

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The descending (n,) tensor of training timesteps to visit, as the diffusers scheduler's set_timesteps."""
        self._check_steps(num_inference_steps)
        return self.plan(num_inference_steps)

    def plan(self, num_inference_steps: int) -> torch.Tensor:
        """DDPMScheduler's and DDIMScheduler's timesteps: n of the T, by `timestep_spacing` (a LongTensor)."""
        num_train = self.schedule.num_train_timesteps
        return spaced_timesteps(self.timestep_spacing, num_train, num_inference_steps, self.steps_offset)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timesteps the network is called with (here the plan itself)."""
        return timesteps

    def plan_length(self, timesteps: torch.Tensor) -> int:
        """n of the plan `timesteps(n)` that `timesteps` ends (a tail, as img2img runs it); len(timesteps) for a whole
        plan, or for timesteps that end no plan. Rules that diffusers ties to n (DDIM's stride T // n, DPM-Solver's
        "n < 15") read it, so a tail runs exactly as diffusers' scheduler started at its begin index.
        """
        k = len(timesteps)
        for n in range(k, self.schedule.num_train_timesteps + 1):
            try:
                full = self.plan(n)
            except ValueError:  # some n are too many for a spacing
                continue
            if len(full) >= k and torch.equal(full[-k:].to(timesteps.dtype), timesteps):
                return n
        return k

    # ----- starting points ----------------------------------------------------------------------------------

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x at timesteps[0] for a run that starts there (img2img, SDEdit): q(x_t | x_0), Ho et al. 2020 eq. 4."""
        t = self._check_timesteps(timesteps)[:1]
        alpha_bar = gather(self.schedule.alphas_cumprod, t, z0)
        return q_sample(z0, noise, alpha_bar)

    def start_from_noise(self, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x at timesteps[0] for a run from pure noise ε ~ N(0, I): ε itself (diffusers' init_noise_sigma = 1)."""
        return noise

    # ----- the call -----------------------------------------------------------------------------------------

    def coefficients(self, timesteps: torch.Tensor) -> Any:
        """Per-step values of the update rule (a NamedTuple with `alpha_bar`), in float64, once per call."""
        raise NotImplementedError

    def step(self, run: Run, i: int, x: torch.Tensor, memory: dict) -> torch.Tensor:
        """x after step i, (B, C, H, W); `memory` holds what a multistep rule keeps between steps of this call."""
        raise NotImplementedError

    def __call__(
        self,
        denoiser: Denoiser,
        x_T: torch.Tensor,
        timesteps: torch.Tensor,
        generator: Generator = None,
        callback: Optional[Callback] = None,
    ) -> torch.Tensor:
        """Run the plan `timesteps` (all of `timesteps(n)`, or a tail of it) from x_T, x at timesteps[0] (B, C, H, W).

        `callback(i, t, x)` is called after each step with the plan's timestep; a tensor it returns replaces x.
        """
        timesteps = self._check_timesteps(timesteps)
        c = self.coefficients(timesteps)
        x = x_T.to(working_dtype(x_T))  # (B, C, H, W)
        ts = timesteps.to(x.device)
        run = Run(denoiser, ts, self.model_timesteps(timesteps).to(x.device), per_step(c.alpha_bar, x), c, generator)
        memory: dict = {}  # per call, so the sampler itself never changes
        for i in range(len(ts)):
            x = self.step(run, i, x, memory)
            x = after_step(callback, i, ts[i], x)
        return x.to(x_T.dtype)

    def _check_steps(self, num_inference_steps: int) -> None:
        check_num_inference_steps(num_inference_steps, self.schedule.num_train_timesteps)

    def _check_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timesteps as a CPU LongTensor, checked to be 1-D, non-empty and inside [0, T)."""
        timesteps = torch.as_tensor(timesteps).to("cpu", torch.long)
        check_timestep_range(timesteps, self.schedule.num_train_timesteps)
        return timesteps


def check_timestep_range(timesteps: torch.Tensor, num_train: int) -> None:
    """1-D, non-empty, every value inside [0, T − 1]."""
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got shape {tuple(timesteps.shape)}")
    if timesteps.min() < 0 or timesteps.max() > num_train - 1:
        raise ValueError(f"timesteps must lie in [0, {num_train}), got {timesteps.tolist()}")


def _spacing(schedule: NoiseSchedule, class_default: str) -> str:
    """The config's timestep_spacing; a config without it gets the scheduler class's default, as diffusers does.

    A schedule built without any config keeps its own `timestep_spacing`.
    """
    if "timestep_spacing" in schedule.config or not schedule.config:
        return schedule.timestep_spacing
    return class_default


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """Samplers keep x_t in at least float32 (float64 stays float64), whatever the network runs in."""
    return torch.promote_types(x.dtype, torch.float32)


def per_step(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-step scalars as one (n,) tensor on x's device and dtype, built once per call; row i is a 0-dim view."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device)


def after_step(callback: Optional[Callback], i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Call `callback(i, t, x)` after step i; a tensor it returns replaces x."""
    if callback is None:
        return x
    replaced = callback(i, t, x)
    return x if replaced is None else replaced.to(device=x.device, dtype=x.dtype)
