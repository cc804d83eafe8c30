"""Inference speed: LatentDiffusionPipeline against diffusers' StableDiffusionPipeline, same weights, one run.

    python benchmarks/bench_inference.py [--steps 20] [--repeats 10] [--model PATH]

For each sampler, both pipelines generate the same prompt with the same seed,
equivalent scheduler and step count; runs alternate between the two so that
machine noise hits both alike. Prints the median warm time per image of each,
the ratio ours/diffusers, the max pixel difference of their outputs, and the
time of each one's first call. Ours runs small UNets eagerly for their first
TRACE_AFTER_CALLS calls and then through a trace (latent_diffusion/pipelines/tracing.py);
the warm times are taken once the trace is in.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline  # noqa: E402

from latent_diffusion import LatentDiffusionPipeline  # noqa: E402
from latent_diffusion.tiny import tiny_components  # noqa: E402

PEERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
PROMPT = "a red circle above a blue square"


def tiny_folder() -> str:
    folder = tempfile.mkdtemp(prefix="bench-tiny-sd-")
    StableDiffusionPipeline(**tiny_components(scheduler="pndm"), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def load_pair(folder: str, sampler: str):
    ours = LatentDiffusionPipeline.from_pretrained(folder)
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                     dtype=ours.unet.dtype)  # ours upcasts fp16 files on a CPU
    theirs.scheduler = PEERS[sampler].from_config(theirs.scheduler.config)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def timed(pipe, steps: int, guidance: float, extra: dict) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    images = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  generator=torch.Generator().manual_seed(0), **extra).images
    return time.perf_counter() - start, images


def warm_until_traced(pipe, steps: int, guidance: float, extra: dict, limit: int = 50) -> None:
    """More warm-up calls until the automatic UNet trace is bought (after TRACE_AFTER_CALLS eager UNet calls)."""
    runner = pipe.traced_unet()
    for _ in range(limit):
        if not runner.enabled or runner.num_traces:
            return
        timed(pipe, steps, guidance, extra)


def bench_sampler(folder: str, sampler: str, steps: int, guidance: float, repeats: int) -> dict:
    ours, theirs = load_pair(folder, sampler)
    ours_t, theirs_t = [], []
    for r in range(repeats + 1):  # the first round warms up and is dropped
        if r == 1:
            warm_until_traced(ours, steps, guidance, {"sampler": sampler})
        t_a, a = timed(ours, steps, guidance, {"sampler": sampler})
        t_b, b = timed(theirs, steps, guidance, {})
        ours_t.append(t_a)
        theirs_t.append(t_b)
    ours_s, theirs_s = statistics.median(ours_t[1:]), statistics.median(theirs_t[1:])
    return dict(sampler=sampler, ours=ours_s, diffusers=theirs_s, ratio=ours_s / theirs_s,
                max_pixel_diff=float(np.abs(a - b).max() * 255), ours_first=ours_t[0], diffusers_first=theirs_t[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers SD folder (default: tiny components built from config)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model or tiny_folder()
    print(f"torch threads: {torch.get_num_threads()}, steps: {args.steps}, guidance: {args.guidance}")
    print("| sampler | ours s/image | diffusers s/image | ratio ours/diffusers | max pixel diff (0-255) "
          "| first call ours / diffusers |")
    print("|---|---|---|---|---|---|")
    for sampler in PEERS:
        r = bench_sampler(folder, sampler, args.steps, args.guidance, args.repeats)
        print(f"| {r['sampler']} | {r['ours']:.4f} | {r['diffusers']:.4f} | {r['ratio']:.3f} | {r['max_pixel_diff']:.2f} "
              f"| {r['ours_first']:.3f} s / {r['diffusers_first']:.3f} s |")


if __name__ == "__main__":
    main()
