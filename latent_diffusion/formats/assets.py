"""Where the embedded default model lives inside the installed package."""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"  # latent_diffusion/default_model
# The embedded default distilled into a latent consistency model (training/recipes/shapes/distill.py):
# latent_diffusion/default_model_lcm, the same VAE, text encoder and tokenizer files with its own UNet and scheduler
LCM_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model_lcm"
# Embedded models by the name `from_pretrained(name)` / `--model NAME` accepts
EMBEDDED_MODELS = {"default-20-step": DEFAULT_MODEL_DIR, "default-lcm": LCM_MODEL_DIR}
# What `from_pretrained()`, `generate`, `serve` and `eval` load when no model is named. The few-step model takes
# this place once its recipe measures the 20-step model's adherence within 0.3× its time ("targets_hold" in
# default_model_lcm/distill_recipe.json; tests/test_default_lcm.py keeps the two in step). Training starts from
# the 20-step model (`default_model_path`) either way.
GENERATION_DEFAULT = "default-20-step"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # required where model_index.json names them
# ControlNets shipped for the embedded default, by the name `controlnet=` / `--controlnet` accepts; one subfolder
# per kind of control image (latent_diffusion/default_controlnet/outline/: Shapes outlines)
DEFAULT_CONTROLNETS = {"default-outline": Path(__file__).resolve().parents[1] / "default_controlnet" / "outline"}


def default_model_path() -> Path:
    """The embedded Shapes model's folder; a clear error when this install has none."""
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no embedded default model at {DEFAULT_MODEL_DIR}; pass a diffusers folder or Hub id to "
            "`from_pretrained(path)` / `--model PATH`"
        )
    return DEFAULT_MODEL_DIR


def generation_default_path() -> Path:
    """The folder generation loads when no model is named (GENERATION_DEFAULT); a clear error when it is missing."""
    return Path(resolve_model_name(GENERATION_DEFAULT))


def resolve_model_name(name):
    """An embedded model's folder for its name ("default-lcm", "default-20-step"), else `name` unchanged."""
    if not isinstance(name, str) or name not in EMBEDDED_MODELS:
        return name
    folder = EMBEDDED_MODELS[name]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"model {name!r}: this install has no {folder}; give a diffusers folder or Hub id")
    return str(folder)


def is_embedded_folder(path) -> bool:
    """Whether `path` is one of the embedded models' folders."""
    return any(Path(path).resolve() == folder.resolve() for folder in EMBEDDED_MODELS.values())


def resolve_controlnet_name(name: str) -> str:
    """A shipped ControlNet's folder for its name ("default-outline"), else `name` unchanged."""
    if name not in DEFAULT_CONTROLNETS:
        return name
    folder = DEFAULT_CONTROLNETS[name]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"controlnet {name!r}: this install has no {folder}; give a ControlNet folder")
    return str(folder)


def missing_components(folder: Path) -> list[str]:
    """Components a local diffusers folder lacks (model_index.json counts as one)."""
    index_file = folder / "model_index.json"
    missing = [] if index_file.is_file() else ["model_index.json"]
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    listed = [name for name in SDXL_COMPONENTS if (index.get(name) or [None])[0] is not None]
    return missing + [name for name in REQUIRED_COMPONENTS + tuple(listed) if not (folder / name).is_dir()]
