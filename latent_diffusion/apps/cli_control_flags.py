"""The CLI's ControlNet flags (part of cli.py, kept apart for length): `generate`'s --controlnet,
--control-image, --control-scale, --control-start, --control-end, --control-preprocess; `serve`'s
--controlnet and --control-scale (the page's default weight).

Each flag repeats, one per ControlNet (all but --controlnet and --control-image may also be given once for all).
They become `GenerationSettings.controls` (one `ControlUnit` per net), which the PNG records and `--from-png`
reads back (`controls_from_png`). Errors name the flag; the library's ValueErrors name its parameters.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latent_diffusion.checks import check_finite
from latent_diffusion.control_images import PREPROCESSORS

# generate's per-net flags (argparse dest, ControlUnit field, default) that may be given once for all nets
PER_NET_FLAGS = (("control_scale", "scale", 1.0), ("control_start", "start", 0.0), ("control_end", "end", 1.0),
                 ("control_preprocess", "preprocess", "none"))


def add_serve_control_flags(parser: argparse.ArgumentParser) -> None:
    """serve's --controlnet (repeatable) and --control-scale (the page's default weight of each)."""
    _add_controlnet_flag(parser, "; the page then has a control-image input for each, the A1111 API takes "
                                 "sd-webui-controlnet units naming it")
    parser.add_argument("--control-scale", action="append", type=float, default=[], metavar="SCALE",
                        help="the page's default ControlNet weight (default 1.0); once for all, or once per --controlnet")


def _add_controlnet_flag(parser: argparse.ArgumentParser, more: str) -> None:
    parser.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                        help="diffusers ControlNet folder, Hub id, or 'default-outline' (the embedded model's Shapes "
                             "outline ControlNet); repeat for several" + more)


def add_control_flags(parser: argparse.ArgumentParser) -> None:
    _add_controlnet_flag(parser, " (one --control-image each)")
    parser.add_argument("--control-image", action="append", default=[], metavar="PATH",
                        help="control image for the matching --controlnet (its size is the default output size)")
    parser.add_argument("--control-scale", action="append", type=float, default=[], metavar="SCALE",
                        help="ControlNet conditioning scale (default 1.0); once for all, or once per --controlnet")
    parser.add_argument("--control-start", action="append", type=float, default=[], metavar="FRACTION",
                        help="fraction of the steps after which the ControlNet starts acting (default 0)")
    parser.add_argument("--control-end", action="append", type=float, default=[], metavar="FRACTION",
                        help="fraction of the steps after which it stops (default 1)")
    parser.add_argument("--control-preprocess", action="append", default=[], choices=tuple(PREPROCESSORS),
                        help="turn the control image into what the ControlNet reads first (canny: its edges); "
                             "once for all, or once per --controlnet")
    parser.add_argument("--guess-mode", action="store_true",
                        help="ControlNet guess mode: the nets see the conditional branch only, residuals ramped "
                             "0.1 to 1 (sd-webui-controlnet's 'ControlNet is more important')")


def check_control_flags(args: argparse.Namespace) -> None:
    """ValueError / FileNotFoundError naming the flag, before any model loads."""
    nets, images = len(args.controlnet), len(args.control_image)
    if images != nets:
        raise ValueError(f"--control-image given {images} time(s) for {nets} --controlnet; give one per --controlnet")
    for dest, _, _ in PER_NET_FLAGS:
        values, flag = getattr(args, dest), "--" + dest.replace("_", "-")
        if values and len(values) not in (1, nets):
            raise ValueError(f"{flag} given {len(values)} times for {nets} --controlnet; give it once or once each")
    for scale in args.control_scale:
        check_finite("--control-scale", scale, 0)
    for flag, values in (("--control-start", args.control_start), ("--control-end", args.control_end)):
        for value in values:
            check_finite(flag, value, 0, 1)
    for unit in control_units(args):
        if unit.start >= unit.end:
            raise ValueError(f"--control-start ({unit.start:g}) must be below --control-end ({unit.end:g})")
    for path in args.control_image:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--control-image: no such file {path!r}")
    check_controlnet_paths(args.controlnet)


def check_controlnet_paths(paths) -> None:
    """Each --controlnet an existing folder, a Hub id or a shipped name (ValueError naming the flag)."""
    from latent_diffusion.formats.model_files import looks_like_local_path

    for path in paths:
        if Path(path).expanduser().is_file() or (looks_like_local_path(path) and not Path(path).expanduser().exists()):
            raise ValueError(f"--controlnet {path!r}: give an existing diffusers ControlNet folder or a Hub id")


def check_serve_control_flags(args: argparse.Namespace) -> None:
    """serve's --control-scale: once, or once per --controlnet, each >= 0."""
    if args.control_scale and len(args.control_scale) not in (1, len(args.controlnet)):
        raise ValueError(f"--control-scale given {len(args.control_scale)} times for {len(args.controlnet)} "
                         "--controlnet; give it once or once each")
    for scale in args.control_scale:
        check_finite("--control-scale", scale, 0)
    check_controlnet_paths(args.controlnet)


def control_loading_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`from_pretrained` keywords: the ControlNet folders (none: nothing, so a folder's own ControlNet stays)."""
    if not args.controlnet:
        return {}
    return {"controlnet": args.controlnet[0] if len(args.controlnet) == 1 else list(args.controlnet)}


def control_units(args: argparse.Namespace) -> tuple:
    """The flags as `GenerationSettings.controls`: one ControlUnit per --controlnet, its image the --control-image path."""
    from latent_diffusion.settings import ControlUnit

    nets = len(args.controlnet)
    per_net = {}
    for dest, field, default in PER_NET_FLAGS:
        values = list(getattr(args, dest)) or [default]
        per_net[field] = values * nets if len(values) == 1 else values
    return tuple(ControlUnit(model, image, **{field: per_net[field][k] for field in per_net})
                 for k, (model, image) in enumerate(zip(args.controlnet, args.control_image)))


def controls_from_png(args: argparse.Namespace, recorded, png: str) -> None:
    """--from-png: take the recorded ControlNets and their settings unless --controlnet is given; the control
    image is not in the PNG, so it comes from --control-image (or our PNG's recorded path, when that file exists)."""
    if "controlnet" in args.given or not recorded.controls:
        return
    args.controlnet = [unit.model for unit in recorded.controls]
    for dest, field, _ in PER_NET_FLAGS:
        if dest not in args.given:
            setattr(args, dest, [getattr(unit, field) for unit in recorded.controls])
    if "control_image" not in args.given:
        paths = [unit.image for unit in recorded.controls]
        if not all(path is not None and Path(path).is_file() for path in paths):
            raise ValueError(f"--from-png {png}: it was made with {len(paths)} ControlNet(s) "
                             f"({', '.join(args.controlnet)}) and holds no control image; give --control-image "
                             "(one per --controlnet)")
        args.control_image = paths
