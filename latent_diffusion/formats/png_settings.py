"""The generation settings a PNG records, whichever tool wrote it: ours, AUTOMATIC1111, or ComfyUI.

Our own keys come first (they hold everything, so our PNGs are remade byte for byte), then A1111's
`parameters` infotext (`formats.infotext`), then a ComfyUI `prompt` graph (`formats.comfyui`, plain
text-to-image graphs only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from latent_diffusion.formats.comfyui import is_comfy_graph, settings_from_comfy_graph
from latent_diffusion.formats.infotext import PARAMETERS_KEY, settings_from_infotext
from latent_diffusion.formats.pngmeta import read_png_metadata
from latent_diffusion.settings import REQUIRED_PNG_KEYS, GenerationSettings


def settings_from_text_chunks(metadata: dict[str, str]) -> GenerationSettings:
    """Settings from a PNG's text chunks; ValueError (argument `png`) when no known tool's settings are there."""
    if all(key in metadata for key in REQUIRED_PNG_KEYS):
        return GenerationSettings.from_png_metadata(metadata)
    if PARAMETERS_KEY in metadata:
        return settings_from_infotext(metadata[PARAMETERS_KEY])
    if is_comfy_graph(metadata.get("prompt", "")):
        return settings_from_comfy_graph(metadata["prompt"])
    raise ValueError("png: no generation settings in this image (neither latent-diffusion's keys, A1111's "
                     "'parameters' nor a ComfyUI 'prompt' graph)")


def settings_from_png(path: Union[str, Path]) -> GenerationSettings:
    """Settings recorded in the PNG at `path` (see settings_from_text_chunks)."""
    return settings_from_text_chunks(read_png_metadata(path))
