"""Where the embedded default model lives inside the installed package."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def default_model_path() -> Path:
    """The embedded Shapes model's folder; a clear error when this install has none."""
    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no embedded default model at {DEFAULT_MODEL_DIR}; pass a diffusers folder or Hub id to "
            "`from_pretrained(path)` / `--model PATH`"
        )
    return DEFAULT_MODEL_DIR


def missing_components(folder: Path) -> list[str]:
    """Components a local diffusers folder lacks (model_index.json counts as one)."""
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    return missing + [name for name in REQUIRED_COMPONENTS if not (folder / name).is_dir()]
