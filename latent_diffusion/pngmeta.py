"""PNG text metadata recording how an image was made, so any output can be reproduced."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin


def library_versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    from latent_diffusion import __version__

    return {"latent_diffusion": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def generation_metadata(pipe, args: Any, seed: int) -> dict[str, str]:
    """What a generated PNG records: the settings actually used (the model's defaults filled in)."""
    d = pipe.generation_defaults
    image_size = pipe._check_size("height", args.height), pipe._check_size("width", args.width)
    return {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt or "",
        "seed": str(seed),
        "sampler": args.sampler or d["sampler"],
        "steps": str(args.steps or d["num_inference_steps"]),
        "guidance": str(d["guidance_scale"] if args.guidance is None else args.guidance),
        "guidance_rescale": str(args.guidance_rescale),
        "eta": str(args.eta),
        "height": str(image_size[0]),
        "width": str(image_size[1]),
        "model": str(args.model or "embedded default"),
        **({"lora": " ".join(args.lora)} if getattr(args, "lora", None) else {}),  # PATH[:SCALE] of each adapter
        "versions": json.dumps(library_versions()),
    }


def save_png(image: Image.Image, path: Path, metadata: dict[str, str]) -> Path:
    """Write `image` with `metadata` as PNG tEXt chunks; parent folders are created."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path
