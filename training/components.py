"""Load the parts of a diffusers text-to-image folder (or Hub id, or single .safetensors checkpoint) one by one.

Loading part by part lets a run skip the pretrained UNet when `--unet_config`
trains one from scratch, and gives errors that name the missing part.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

from latent_diffusion.formats.model_files import WEIGHT_COMPONENTS, check_model_path

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")  # loaded where model_index.json names them, else None


def load_components(path: str, *, revision: Optional[str] = None, variant: Optional[str] = None,
                    cache_dir: Optional[str] = None, skip: tuple[str, ...] = (),
                    single_file_config: Optional[str] = None) -> dict[str, Any]:
    """{'unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler', 'text_encoder_2', 'tokenizer_2'} loaded from
    `path` (those in `skip`, and the SDXL ones of an SD folder, are None)."""
    from diffusers import DiffusionPipeline

    from latent_diffusion.formats.single_file import is_single_file, load_single_file

    if is_single_file(path):  # one .safetensors checkpoint in the original SD layout (formats/single_file.py)
        parts = load_single_file(path, config=single_file_config, argument="--pretrained_model_name_or_path")
        return {name: None if name in skip else parts.get(name) for name in COMPONENTS + SDXL_COMPONENTS}
    check_model_path(path, "--pretrained_model_name_or_path",  # safetensors only, whole: never torch.load
                     components=[name for name in WEIGHT_COMPONENTS if name not in skip])
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
        if name in WEIGHT_COMPONENTS:
            kwargs["use_safetensors"] = True
            if variant is not None:
                kwargs["variant"] = variant
        parts[name] = cls.from_pretrained(path, **kwargs)
    return parts
