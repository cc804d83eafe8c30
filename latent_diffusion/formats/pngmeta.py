"""PNG text metadata recording how an image was made, so any output can be reproduced.

This module reads and writes the text chunks; which keys a generated image records, and reading them back
as settings, is `latent_diffusion.settings.GenerationSettings`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from PIL import Image, PngImagePlugin

from latent_diffusion.formats.atomic import atomic_write


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from latent_diffusion import __version__

    return {"latent_diffusion": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def save_png(image: Image.Image, path: Path, metadata: dict[str, str]) -> Path:
    """Write `image` with `metadata` as PNG tEXt chunks, atomically; parent folders are created."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    with atomic_write(path, suffix=".png") as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_png_metadata(path: Union[str, Path]) -> dict[str, str]:
    """The text metadata of a PNG (what `save_png` wrote); ValueError if the file is not a PNG."""
    with Image.open(path) as image:
        if image.format != "PNG":
            raise ValueError(f"{Path(path).name} is a {image.format} image, not a PNG with generation metadata")
        return dict(image.text)
