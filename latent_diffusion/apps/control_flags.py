"""The `generate` command's ControlNet flags: --controlnet, --control-image, --control-scale, --control-preprocess.

Each flag repeats, one per ControlNet (--control-scale and --control-preprocess may also be given once for all).
Errors name the flag; the library's ValueErrors name its parameters.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latent_diffusion.control_images import PREPROCESSORS


def add_control_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                        help="diffusers ControlNet folder, Hub id, or 'default-outline' (the embedded model's Shapes "
                             "outline ControlNet); repeat for several (one --control-image each)")
    parser.add_argument("--control-image", action="append", default=[], metavar="PATH",
                        help="control image for the matching --controlnet (its size is the default output size)")
    parser.add_argument("--control-scale", action="append", type=float, default=[], metavar="SCALE",
                        help="ControlNet conditioning scale (default 1.0); once for all, or once per --controlnet")
    parser.add_argument("--control-preprocess", action="append", default=[], choices=tuple(PREPROCESSORS),
                        help="turn the control image into what the ControlNet reads first (canny: its edges); "
                             "once for all, or once per --controlnet")


def check_control_flags(args: argparse.Namespace) -> None:
    """ValueError / FileNotFoundError naming the flag, before any model loads."""
    from latent_diffusion.checks import check_finite
    from latent_diffusion.formats.model_files import looks_like_local_path

    nets, images = len(args.controlnet), len(args.control_image)
    if images != nets:
        raise ValueError(f"--control-image given {images} time(s) for {nets} --controlnet; give one per --controlnet")
    for flag, values in (("--control-scale", args.control_scale), ("--control-preprocess", args.control_preprocess)):
        if values and len(values) not in (1, nets):
            raise ValueError(f"{flag} given {len(values)} times for {nets} --controlnet; give it once or once each")
    for scale in args.control_scale:
        check_finite("--control-scale", scale, 0)
    for path in args.control_image:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--control-image: no such file {path!r}")
    for path in args.controlnet:
        if Path(path).expanduser().is_file() or (looks_like_local_path(path) and not Path(path).expanduser().exists()):
            raise ValueError(f"--controlnet {path!r}: give an existing diffusers ControlNet folder or a Hub id")


def control_loading_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`from_pretrained` keywords: the ControlNet folders (none: nothing, so a folder's own ControlNet stays)."""
    if not args.controlnet:
        return {}
    return {"controlnet": args.controlnet[0] if len(args.controlnet) == 1 else list(args.controlnet)}


def control_call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`pipe(...)` keywords: the opened, preprocessed control images and the scales."""
    import PIL.Image

    from latent_diffusion.control_images import preprocess_control_image

    nets = len(args.controlnet)
    if not nets:
        return {}
    steps = args.control_preprocess * nets if len(args.control_preprocess) == 1 else args.control_preprocess
    steps = steps or ["none"] * nets
    images = [preprocess_control_image(step, PIL.Image.open(path)) for step, path in zip(steps, args.control_image)]
    scales = args.control_scale or [1.0]
    return {"control_image": images[0] if nets == 1 else images,
            "controlnet_conditioning_scale": scales[0] if len(scales) == 1 else scales}
