"""PNG text metadata recording how an image was made, so any output can be reproduced."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image, PngImagePlugin

from latent_diffusion.formats.atomic import atomic_write


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from latent_diffusion import __version__

    return {"latent_diffusion": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def generation_metadata(
    pipe,
    *,
    prompt: str,
    seed: int,
    negative_prompt: Optional[str] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    guidance: Optional[float] = None,
    guidance_rescale: Optional[float] = None,
    eta: Optional[float] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    model: Optional[str] = None,
    lora: Optional[Sequence[str]] = None,
    clip_skip: Optional[int] = None,
) -> dict[str, str]:
    """What a generated PNG records: the settings actually used.

    None takes what the pipeline call takes for it: the model's defaults (`pipe.generation_defaults`) for
    sampler, steps and guidance, its native size (`pipe.resolve_size`), 0 for guidance_rescale and eta,
    "embedded default" for the model. The CLI and the web UI both write through this, so the same
    settings give the same PNG.
    """
    d = pipe.generation_defaults
    image_height, image_width = pipe.resolve_size(height, width)
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "seed": str(seed),
        "sampler": sampler or d["sampler"],
        "steps": str(steps or d["num_inference_steps"]),
        "guidance": str(d["guidance_scale"] if guidance is None else guidance),
        "guidance_rescale": str(0.0 if guidance_rescale is None else guidance_rescale),
        "eta": str(0.0 if eta is None else eta),
        "height": str(image_height),
        "width": str(image_width),
        "model": str(model or "embedded default"),
        **({"lora": " ".join(lora)} if lora else {}),  # PATH[:SCALE] of each adapter
        **({"clip_skip": str(clip_skip)} if clip_skip else {}),
        "versions": json.dumps(library_versions()),
    }


def image_input_metadata(args: Any, image: Image.Image) -> dict[str, str]:
    """What an img2img / inpainting PNG adds: the input and mask paths, the strength used, the output's real size."""
    if getattr(args, "image", None) is None:
        return {}
    from latent_diffusion.diffusion.sdedit import default_strength

    meta = {"image": str(args.image), "strength": str(default_strength(args.strength, inpainting=args.mask is not None)),
            "height": str(image.height), "width": str(image.width)}
    return {**meta, "mask": str(args.mask)} if args.mask is not None else meta


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
