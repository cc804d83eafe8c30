"""Which training timesteps a few-step sampler visits: "leading", "trailing" and "linspace" spacing.

The three spacings of Lin et al. 2023 (Table 2), computed as diffusers'
schedulers compute them (numpy, the same rounding), so our samplers visit the
same timesteps as `set_timesteps`. One deliberate difference: for a few step
counts (61, 103, 121, ... of 1000) float error makes numpy's `arange` yield one
extra trailing element, which diffusers returns as a timestep of -1; we keep
the first n.
"""
from __future__ import annotations

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")


def check_num_inference_steps(num_inference_steps: int, num_train_timesteps: int) -> None:
    """1 <= n <= T, with an error naming the argument."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps}, "
            f"got {num_inference_steps}"
        )


def leading_timesteps(num_train: int, n: int, steps_offset: int = 0) -> np.ndarray:
    """t_i = i · ⌊T/n⌋ + offset, i = n−1..0: the grid starts at 0, so the top step stays below T − 1."""
    step = num_train // n
    return (np.arange(0, n) * step).round()[::-1].astype(np.int64) + steps_offset


def trailing_timesteps(num_train: int, n: int, start: int | None = None) -> np.ndarray:
    """t_i = round(start − i · T/n) − 1, i = 0..n−1: the grid ends at T − 1 (start defaults to T)."""
    start = num_train if start is None else start
    grid = np.round(np.arange(start, 0, -num_train / n))[:n]
    return grid.astype(np.int64) - 1


def linspace_timesteps(last: int, n: int) -> np.ndarray:
    """n points evenly spaced over [0, last], rounded, descending."""
    return np.linspace(0, last, n).round()[::-1].astype(np.int64)


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int = 0) -> torch.Tensor:
    """The n timesteps of DDPMScheduler / DDIMScheduler.set_timesteps, as a descending (n,) LongTensor."""
    if spacing == "leading":
        steps = leading_timesteps(num_train, n, steps_offset)
    elif spacing == "trailing":
        steps = trailing_timesteps(num_train, n)
    elif spacing == "linspace":
        steps = linspace_timesteps(num_train - 1, n)
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return torch.from_numpy(steps.copy())


def solver_timesteps(
    spacing: str, num_train: int, n: int, steps_offset: int = 0, last: int | None = None
) -> torch.Tensor:
    """The timesteps of DPMSolverMultistepScheduler.set_timesteps (descending (n,) LongTensor).

    "leading" and "linspace" lay n + 1 points over [0, last) and drop the one at 0,
    because the solver's final step goes to σ = 0 (or σ_min), not to a timestep.
    `last` (default T) is where λ_min_clipped cuts the schedule.
    """
    last = num_train if last is None else last
    if spacing == "leading":
        steps = leading_timesteps(last, n + 1, steps_offset)[:-1]
    elif spacing == "trailing":
        steps = trailing_timesteps(num_train, n, start=last)
    elif spacing == "linspace":
        steps = linspace_timesteps(last - 1, n + 1)[:-1]
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return torch.from_numpy(steps.copy())


def euler_timesteps(spacing: str, num_train: int, n: int, steps_offset: int = 0) -> torch.Tensor:
    """The n timesteps of EulerDiscreteScheduler / EulerAncestralDiscreteScheduler / HeunDiscreteScheduler.

    As diffusers computes them, in float32: "linspace" is not rounded (n points over [0, T − 1]), so
    these plans may be fractional; returned as a descending (n,) float64 tensor of those float32 values.
    """
    if spacing == "leading":
        steps = leading_timesteps(num_train, n, steps_offset)
    elif spacing == "trailing":
        steps = trailing_timesteps(num_train, n)
    elif spacing == "linspace":
        steps = np.linspace(0, num_train - 1, n, dtype=np.float32)[::-1]
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return torch.from_numpy(steps.astype(np.float32).astype(np.float64))
