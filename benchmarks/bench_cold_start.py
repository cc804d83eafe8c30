"""Cold start: time to the first image from a fresh process, its parts, and the warm per-image time.

    python benchmarks/bench_cold_start.py [--model PATH] [--runs 5] [--steps 20] [--sampler dpm++] [--guidance 7.5]
                                          [--size S] [--warm 3]

Each run starts new processes (so nothing is cached in memory but the OS's file cache):

1. `python -c pass`: the interpreter alone;
2. `latent-diffusion generate PROMPT --model PATH ...`: the CLI's wall time to a PNG on disk (time to first image);
3. a worker process timing its own parts: import (`latent_diffusion.pipelines`), load (`from_pretrained`),
   the first image, then the warm per-image time (median of `--warm` more images, same settings);
4. the same worker with diffusers' `StableDiffusionPipeline` (same weights, the equivalent scheduler): the peer;
5. the import floor: a process importing only the model classes both need (diffusers' UNet2DConditionModel and
   AutoencoderKL modules, transformers' CLIP text model), which no pipeline built on them can go below.

Medians over `--runs`. `--threads N` sets OMP_NUM_THREADS in every process (on a shared, busy CPU,
1 thread can be many times faster than 2). Without --model a tiny SD folder is built from config.
Prints a markdown line for benchmarks/RESULTS.md with the ratio ours/diffusers of the time to first image
(import + load + first image).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle above a blue square"
CHILD_ENV = dict(os.environ, HF_HUB_OFFLINE="1")  # --threads adds OMP_NUM_THREADS
PEER_SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}


# ---------------------------------------------------------------- the worker (runs in a fresh process)


def _load(kind: str, model: str, sampler: str):
    if kind == "ours":
        from latent_diffusion.pipelines import LatentDiffusionPipeline

        pipe = LatentDiffusionPipeline.from_pretrained(model)
        return pipe, {"sampler": sampler}
    import diffusers
    import torch

    # float32 like ours: an fp16 folder (the embedded default) would otherwise load half-precision parts on the CPU
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False,
                                                             torch_dtype=torch.float32)
    pipe.scheduler = getattr(diffusers, PEER_SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    return pipe, {}


def worker(args: argparse.Namespace) -> None:
    """Time import, load, first image and warm images in this (fresh) process; print them as JSON."""
    start = time.perf_counter()
    import importlib

    import torch

    importlib.import_module("latent_diffusion.pipelines" if args.worker == "ours" else "diffusers")
    imported = time.perf_counter()
    pipe, extra = _load(args.worker, args.model, args.sampler)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.perf_counter()

    def image():
        pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size,
             generator=torch.Generator().manual_seed(0), **extra).images[0]

    image()
    first = time.perf_counter()
    warm = []
    for _ in range(args.warm):
        t = time.perf_counter()
        image()
        warm.append(time.perf_counter() - t)
    print(json.dumps(dict(import_s=imported - start, load_s=loaded - imported, first_image_s=first - loaded,
                          warm_image_s=statistics.median(warm) if warm else None)))


# ---------------------------------------------------------------- the driver


def wall_time(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def cli_command(args: argparse.Namespace, out: str) -> list[str]:
    script = Path(sys.executable).with_name("latent-diffusion")
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "latent_diffusion.apps.cli"]
    size = ["--height", str(args.size), "--width", str(args.size)] if args.size else []
    return launcher + ["generate", PROMPT, "-o", out, "--model", args.model, "--steps", str(args.steps),
                       "--sampler", args.sampler, "--guidance", str(args.guidance), "--quiet", *size]


def worker_command(args: argparse.Namespace, kind: str) -> list[str]:
    size = ["--size", str(args.size)] if args.size else []
    return [sys.executable, __file__, "--worker", kind, "--model", args.model, "--steps", str(args.steps),
            "--sampler", args.sampler, "--guidance", str(args.guidance), "--warm", str(args.warm), *size]


FLOOR_IMPORTS = ("import diffusers.models.unets.unet_2d_condition, diffusers.models.autoencoders.autoencoder_kl, "
                 "transformers.models.clip.modeling_clip")


def one_run(args: argparse.Namespace, out: str) -> dict:
    python, _ = wall_time([sys.executable, "-c", "pass"])
    floor, _ = wall_time([sys.executable, "-c", FLOOR_IMPORTS])
    cli, _ = wall_time(cli_command(args, out))
    ours = json.loads(wall_time(worker_command(args, "ours"))[1].strip().splitlines()[-1])
    theirs = json.loads(wall_time(worker_command(args, "diffusers"))[1].strip().splitlines()[-1])
    return dict(python=python, floor=floor, cli=cli, ours=ours, diffusers=theirs)


def medians(runs: list[dict]) -> dict:
    def med(get):
        return statistics.median(get(r) for r in runs)

    result = dict(python=med(lambda r: r["python"]), cli=med(lambda r: r["cli"]), floor=med(lambda r: r["floor"]))
    for kind in ("ours", "diffusers"):
        for key in ("import_s", "load_s", "first_image_s", "warm_image_s"):
            result[f"{kind}_{key}"] = med(lambda r: r[kind][key])
        result[f"{kind}_cold"] = med(lambda r: r[kind]["import_s"] + r[kind]["load_s"] + r[kind]["first_image_s"])
    return result


def tiny_folder() -> str:
    from diffusers import StableDiffusionPipeline

    from latent_diffusion.tiny import tiny_components

    folder = tempfile.mkdtemp(prefix="bench-tiny-sd-")
    StableDiffusionPipeline(**tiny_components(scheduler="pndm"), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def print_results(args: argparse.Namespace, m: dict, label: str) -> None:
    print(f"python start {m['python']:.2f} s; CLI time to first image {m['cli']:.2f} s (median of {args.runs})")
    for kind in ("ours", "diffusers"):
        print(f"{kind:>9}: import {m[f'{kind}_import_s']:.2f} s, load {m[f'{kind}_load_s']:.2f} s, first image "
              f"{m[f'{kind}_first_image_s']:.3f} s, warm image {m[f'{kind}_warm_image_s']:.3f} s "
              f"-> cold {m[f'{kind}_cold']:.2f} s")
    ratio = m["ours_cold"] / m["diffusers_cold"]
    print(f"import floor (model classes only, python start included) {m['floor']:.2f} s = "
          f"{m['floor'] / m['diffusers_cold']:.2f} of diffusers' cold total; CLI / diffusers cold total "
          f"{m['cli'] / m['diffusers_cold']:.2f}")
    command = "python benchmarks/bench_cold_start.py " + " ".join(sys.argv[1:])
    print(f"| {label} | {m['cli']:.2f} s | {m['python']:.2f} s | {m['ours_import_s']:.2f} s | "
          f"{m['ours_load_s']:.2f} s | {m['ours_first_image_s']:.3f} s | {m['ours_warm_image_s']:.3f} s | "
          f"{m['diffusers_cold']:.2f} s | **{ratio:.2f}** | `{command.strip()}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="diffusers SD folder (default: tiny components built from config)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpm++", choices=sorted(PEER_SCHEDULERS))
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--warm", type=int, default=3, help="warm images timed after the first, per worker")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every process (OMP_NUM_THREADS)")
    parser.add_argument("--worker", choices=("ours", "diffusers"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.threads:
        CHILD_ENV["OMP_NUM_THREADS"] = str(args.threads)
    threads = f", {args.threads} thread(s)" if args.threads else ""
    label = (f"{'tiny SD' if args.model is None else args.model}, {args.sampler} {args.steps} steps, "
             f"w={args.guidance:g}{threads}")
    args.model = args.model or tiny_folder()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_run(args, os.path.join(tmp, "first.png")) for _ in range(args.runs)]
    print_results(args, medians(runs), label)


if __name__ == "__main__":
    main()
