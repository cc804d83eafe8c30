"""The large-model path: an SD-1.5-sized model (random weights), ours against diffusers, per image, one run.

    python benchmarks/bench_large_model.py [--size 256] [--steps 2] [--repeats 3] [--dtype float32|bfloat16|float16]
                                           [--channels_last] [--autocast] [--model PATH] [--threads N]

The model is built from SD 1.5's configs (benchmarks/sd_configs.py: the 860M-parameter UNet, the SD VAE, a
768-wide text encoder of 2 layers) unless --model names a folder. Both pipelines share the same module
objects (one copy of the weights in memory): ours (`LatentDiffusionPipeline`, DDIM) and diffusers'
`StableDiffusionPipeline` with `DDIMScheduler`, same prompt, seed, steps, guidance 7.5 (the UNet runs on
a batch of 2). Attention is PyTorch SDPA in both (diffusers' default `AttnProcessor2_0`). `--dtype` loads the
weights in that dtype; `--autocast` keeps fp32 weights and runs under `torch.autocast(cpu, bfloat16)`;
`--channels_last` converts the UNet and VAE. Calls alternate ours/diffusers after one warm-up each; medians.
Also prints what the CPU offers for bf16 (lscpu flags avx512_bf16, amx_bf16).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPT = "a red circle above a blue square"


def cpu_bf16_flags() -> str:
    """The CPU's bf16-related flags from /proc/cpuinfo ('none' if it has none)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2") if f in flags]
    return " ".join(found) or "none"


def load_pair(folder: str, dtype, channels_last: bool):
    """Ours and diffusers' pipelines over the same modules."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(folder, dtype=dtype)
    if channels_last:
        import torch

        ours.unet.to(memory_format=torch.channels_last)
        ours.vae.to(memory_format=torch.channels_last)
    theirs = StableDiffusionPipeline(vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                     unet=ours.unet, scheduler=DDIMScheduler.from_config(ours.scheduler.config),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def one_image(pipe, opts, extra: dict) -> float:
    import torch

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if opts.autocast else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        pipe(PROMPT, num_inference_steps=opts.steps, guidance_scale=7.5, height=opts.size, width=opts.size,
             generator=torch.Generator().manual_seed(0), output_type="np", **extra)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers SD folder (default: SD 1.5 sizes, random weights)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--autocast", action="store_true", help="fp32 weights under torch.autocast(cpu, bfloat16)")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    opts = parser.parse_args()
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    print(f"CPU bf16 support (lscpu flags): {cpu_bf16_flags()}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = opts.model
        if folder is None:
            from sd_configs import sd15_folder

            folder = sd15_folder(os.path.join(tmp, "sd15"))
        ours, theirs = load_pair(folder, getattr(torch, opts.dtype), opts.channels_last)
    params = sum(p.numel() for p in ours.unet.parameters()) / 1e6
    times = {"ours": [], "diffusers": []}
    for r in range(opts.repeats + 1):  # round 0 warms up and is dropped
        for kind, pipe, extra in (("ours", ours, {"sampler": "ddim"}), ("diffusers", theirs, {}))[:: 1 if r % 2 else -1]:
            times[kind].append(one_image(pipe, opts, extra))
        print(f"round {r}: ours {times['ours'][-1]:.2f} s, diffusers {times['diffusers'][-1]:.2f} s", flush=True)
    a, b = statistics.median(times["ours"][1:]), statistics.median(times["diffusers"][1:])
    setting = f"{opts.dtype}{' +autocast bf16' if opts.autocast else ''}{' channels_last' if opts.channels_last else ''}"
    command = "python benchmarks/bench_large_model.py " + " ".join(sys.argv[1:])
    print(f"| UNet {params:.0f}M params, {opts.size} px, DDIM {opts.steps} steps, w=7.5, {setting}, "
          f"{torch.get_num_threads()} thread(s) | {a:.2f} s | {b:.2f} s | **{a / b:.2f}** | `{command.strip()}` |")


if __name__ == "__main__":
    main()
