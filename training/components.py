"""Load the parts of a diffusers text-to-image folder (or Hub id) one by one, as model_index.json names them.

Loading part by part lets a run skip the pretrained UNet when `--unet_config`
trains one from scratch, and gives errors that name the missing part.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional

from latent_diffusion.assets import missing_components

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # loaded where model_index.json names them, else None


def load_components(path: str, *, revision: Optional[str] = None, variant: Optional[str] = None,
                    cache_dir: Optional[str] = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """{'unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler', 'text_encoder_2', 'tokenizer_2'} loaded from
    `path` (those in `skip`, and the SDXL ones of an SD folder, are None)."""
    from diffusers import DiffusionPipeline

    if os.path.isdir(path):
        missing = missing_components(Path(path))
        if missing:
            raise ValueError(f"--pretrained_model_name_or_path {path!r} is missing {missing}; a diffusers text-to-"
                             "image folder holds model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/")
    elif os.path.isabs(path) or path.count("/") > 1:  # not a folder, and not shaped like a Hub id either
        raise ValueError(f"--pretrained_model_name_or_path {path!r} is neither a folder nor a Hub id")
    index = DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir)
    parts = {}
    sdxl = [name for name in SDXL_COMPONENTS if (index.get(name) or [None])[0] is not None]
    for name in COMPONENTS + SDXL_COMPONENTS:
        if name in skip or (name in SDXL_COMPONENTS and name not in sdxl):
            parts[name] = None
            continue
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise ValueError(f"--pretrained_model_name_or_path {path!r}: model_index.json has no {name!r} component")
        library, class_name = entry
        cls = getattr(importlib.import_module(library), class_name)
        kwargs = dict(subfolder=name, revision=revision, cache_dir=cache_dir)
        if name in ("unet", "vae", "text_encoder", "text_encoder_2") and variant is not None:
            kwargs["variant"] = variant
        parts[name] = cls.from_pretrained(path, **kwargs)
    return parts
