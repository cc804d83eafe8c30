"""What a fine-tune writes into its output's generation_config.json, and the `default` base-model name.

A fine-tuned folder keeps its base model's generation defaults (sampler, steps, guidance: the base's
generation_config.json) unless `--generation_defaults KEY=VALUE ...` says otherwise; a base without one
gives the pipeline's FALLBACK_DEFAULTS. `--pretrained_model_name_or_path default` names the embedded
Shapes model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from latent_diffusion.settings import FALLBACK_DEFAULTS

DEFAULT_MODEL_NAME = "default"  # --pretrained_model_name_or_path default: the embedded Shapes model
GENERATION_CONFIG = "generation_config.json"
VALUE_TYPES = {"num_inference_steps": int, "guidance_scale": float, "sampler": str}


def resolve_model_name(name: str) -> str:
    """The embedded default model's folder for "default", else `name` unchanged."""
    if name != DEFAULT_MODEL_NAME:
        return name
    from latent_diffusion.formats.assets import default_model_path

    return str(default_model_path())


def parse_generation_overrides(items: Optional[Sequence[str]]) -> dict[str, Any]:
    """`["sampler=ddim", "num_inference_steps=20"]` -> {"sampler": "ddim", "num_inference_steps": 20}.

    ValueError naming --generation_defaults for an unknown key, a missing '=', or a bad value.
    """
    from latent_diffusion.diffusion.samplers import SAMPLER_NAMES

    overrides = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or key not in VALUE_TYPES:
            raise ValueError(f"--generation_defaults takes KEY=VALUE with KEY one of {tuple(VALUE_TYPES)}, got {item!r}")
        try:
            value = VALUE_TYPES[key](text)
        except ValueError:
            raise ValueError(f"--generation_defaults {key} must be a {VALUE_TYPES[key].__name__}, got {text!r}") from None
        if key == "sampler" and value not in SAMPLER_NAMES:
            raise ValueError(f"--generation_defaults sampler must be one of {SAMPLER_NAMES}, got {value!r}")
        if key != "sampler" and not value > 0:
            raise ValueError(f"--generation_defaults {key} must be > 0, got {text!r}")
        overrides[key] = value
    return overrides


def base_generation_defaults(base: str) -> dict[str, Any]:
    """The base model's generation_config.json values (a local folder), else FALLBACK_DEFAULTS."""
    path = Path(base) / GENERATION_CONFIG
    stored = json.loads(path.read_text()) if path.is_file() else {}
    return {key: stored.get(key, fallback) for key, fallback in FALLBACK_DEFAULTS.items()}


def output_generation_defaults(base: str, overrides: Optional[Sequence[str]]) -> dict[str, Any]:
    """What the fine-tuned folder's generation_config.json holds: the base's, then the flags'."""
    return {**base_generation_defaults(base), **parse_generation_overrides(overrides)}
