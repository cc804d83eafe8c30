"""Argument checks shared by every entry point: one-line errors that name the argument and what is allowed.

The pipeline, the CLI, the training script and the eval command all validate through these, so a bad
value reads the same everywhere (`ValueError("guidance_scale must be a finite number >= 0, got nan")`).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def check_finite(name: str, value: Any, minimum: Optional[float] = None, maximum: Optional[float] = None) -> float:
    """A real, finite number within [minimum, maximum] (either bound optional); returns it as a float."""
    allowed = "a finite number" + (f" >= {minimum:g}" if minimum is not None else "") + (
        f" <= {maximum:g}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


def check_int(name: str, value: Any, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """An integer within [minimum, maximum]; returns it."""
    allowed = f"an integer >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    """One of `allowed`; returns it."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


MAX_IMAGE_SIDE = 8192  # pixels; SD-family VAEs and UNets are used up to 2048, so more is a typo, not a request


class NonFiniteError(FloatingPointError):
    """A tensor that must hold finite numbers holds NaN or inf (sampling latents, a training loss)."""


def check_image_side(name: str, value: Any, multiple: int, maximum: int = MAX_IMAGE_SIDE) -> int:
    """An image height or width: a positive multiple of `multiple` (the VAE × UNet factor), at most `maximum`."""
    allowed = f"a positive multiple of {multiple} and at most {maximum} for this model"
    if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple or value > maximum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_all_finite(name: str, tensor, hint: str = "") -> None:
    """NonFiniteError when `tensor` holds NaN or inf (one host sync: call it once per loop, not per step)."""
    import torch

    if not bool(torch.isfinite(tensor).all()):
        bad = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
        raise NonFiniteError(f"{name} became non-finite ({bad})" + (f"; {hint}" if hint else ""))


def check_finite_flags(values: dict[str, Any], bounds: dict[str, tuple[Optional[float], Optional[float]]]) -> list[str]:
    """The error of every `values[flag]` (None skipped) outside check_finite's `bounds[flag]`; [] when all are fine."""
    problems = []
    for flag, (low, high) in bounds.items():
        if values.get(flag) is None:
            continue
        try:
            check_finite(flag, values[flag], low, high)
        except ValueError as error:
            problems.append(str(error))
    return problems


def one_line(error: BaseException) -> str:
    """An exception as one line for a command's error message: an OSError's reason and file, else its first line
    (with the line after it when the first ends in ':'), at most 500 characters."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Error(s) in loading state_dict for X:" + the first reason
        return f"{lines[0]} {lines[1]}"[:500]
    return lines[0][:500] if lines else type(error).__name__


def check_device(name: str, value: str):
    """A torch device this machine has (cpu, cuda, cuda:N, mps, ...); returns the torch.device."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device such as cpu, cuda, cuda:1 or mps, got {value!r}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{name} {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                         f"that this torch ({torch.__version__}) can use")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {value!r}: MPS is not available on this machine")
    return device
