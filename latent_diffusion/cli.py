"""The `latent-diffusion` command line: generate images, export Shapes data, evaluate models.

The outermost layer: it may import the pipeline; heavy imports happen inside
the subcommands so that `--help` is instant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-diffusion", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    _add_shapes_export(commands)
    return parser


def _add_shapes_export(commands) -> None:
    p = commands.add_parser("shapes-export", help="write N captioned Shapes images as an imagefolder (metadata.jsonl)")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=1000, help="number of (image, caption) pairs")
    p.add_argument("--size", type=int, default=64, help="canvas side: a multiple of 8 from 32 to 512")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", help="train (no held-out pairs), heldout or all")
    p.add_argument("--full-captions", action="store_true", help="keep every optional caption part")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir")
    p.set_defaults(run=run_shapes_export)


def run_shapes_export(args: argparse.Namespace) -> list[Path]:
    from latent_diffusion.shapes import export_imagefolder

    folder = export_imagefolder(args.out_dir, args.n, size=args.size, seed=args.seed, split=args.split,
                                drop_optional=not args.full_captions, overwrite=args.overwrite)
    return [folder]


def _add_generate(commands) -> None:
    p = commands.add_parser("generate", help="generate images for a prompt")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; with --n K > 1, files NAME-0.png … NAME-(K-1).png")
    p.add_argument("--model", default=None, help="diffusers folder or Hub id (default: the embedded Shapes model)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--guidance-rescale", type=float, default=0.0)
    p.add_argument("--sampler", default=None, help="ddpm, ddim or dpm++ (default: the model's)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's η")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--device", default=None, help="cpu, cuda, mps… (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> list[Path]:
    import torch

    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.pngmeta import generation_metadata, save_png

    if args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    pipe = LatentDiffusionPipeline.from_pretrained(args.model) if args.model else LatentDiffusionPipeline.from_pretrained()
    pipe.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=args.quiet)
    seeds = [args.seed + k for k in range(args.n)]
    result = pipe(
        [args.prompt] * args.n,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
        sampler=args.sampler,
        eta=args.eta,
        height=args.height,
        width=args.width,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    )
    return [save_png(image, path, generation_metadata(pipe, args, seed)) for image, path, seed in
            zip(result.images, output_paths(args.output, args.n), seeds)]


def output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}") for k in range(n)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"latent-diffusion {args.command}: error: {error}", file=sys.stderr)
        return 2
    for path in written or []:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
