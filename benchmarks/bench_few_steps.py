"""Seconds for one 64 px image of the embedded default at several (model, sampler, steps, guidance) settings.

    python benchmarks/bench_few_steps.py --model teacher=latent_diffusion/default_model --model lcm=runs/lcm \\
        --setting teacher:ddim:20:4 --setting lcm:lcm:4:1 --repeats 9 [--unet eager] --out runs/few_steps_timing.json

One prompt, batch 1, as the model card's "one image at the defaults". Every setting gets one untimed
warm-up call, then the repeats go round the settings in turn, so that the load of a shared box hits them
alike; each setting's figure is its median. The JSON's "seconds" keys are NAME:SAMPLER:STEPS:GUIDANCE,
which benchmarks/few_steps_table.py reads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from latent_diffusion import LatentDiffusionPipeline  # noqa: E402

PROMPT = "a red circle above a blue square"
UNET_RUNS = {"auto": None, "eager": False, "traced": True}  # --unet -> pipe.trace_unet


def one_image(pipe, sampler: str, steps: int, guidance: float) -> float:
    """Wall seconds of one pipeline call: text encoding, sampling and VAE decoding of one image."""
    started = time.perf_counter()
    pipe(PROMPT, sampler=sampler, num_inference_steps=steps, guidance_scale=guidance,
         generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - started


def parse_setting(text: str, models: dict) -> tuple[str, str, int, float]:
    """NAME:SAMPLER:STEPS:GUIDANCE, NAME one of --model's."""
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in models:
        raise SystemExit(f"--setting: expected NAME:SAMPLER:STEPS:GUIDANCE with NAME in {sorted(models)}, got {text!r}")
    return parts[0], parts[1], int(parts[2]), float(parts[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=FOLDER")
    parser.add_argument("--setting", action="append", required=True, help="NAME:SAMPLER:STEPS:GUIDANCE")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--unet", choices=tuple(UNET_RUNS), default="auto",
                        help="eager: never traced (one call, `generate`); traced: from the first call (a long session); "
                             "auto: the pipeline's own rule (traced after its first calls)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    models = dict(m.partition("=")[::2] for m in args.model)
    pipes = {name: LatentDiffusionPipeline.from_pretrained(path) for name, path in models.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.trace_unet = UNET_RUNS[args.unet]
    settings = [parse_setting(s, models) for s in args.setting]
    times: dict[tuple, list[float]] = {s: [] for s in settings}
    for s in settings:  # warm-up (and the pipeline's UNet trace) outside the timing
        for _ in range(2):
            one_image(pipes[s[0]], *s[1:])
    for _ in range(args.repeats):
        for s in settings:
            times[s].append(one_image(pipes[s[0]], *s[1:]))
    seconds = {f"{n}:{sm}:{st}:{g:g}": statistics.median(v) for (n, sm, st, g), v in times.items()}
    for key, value in seconds.items():
        print(f"{key:32s} {value:.4f} s")
    with open(args.out, "w") as f:
        json.dump({"seconds": seconds, "threads": torch.get_num_threads(), "repeats": args.repeats, "unet": args.unet,
                   "load_average": os.getloadavg(), "models": models}, f, indent=2)


if __name__ == "__main__":
    main()
