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
