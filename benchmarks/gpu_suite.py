"""The GPU suite (run by benchmarks/gpu_suite.sh): SD-1.5-sized, ours against diffusers, in one prepared run.

    python benchmarks/gpu_suite.py --out DIR [--budget 450] [--dry-run] [--skip-training]

1. inference, per dtype (float16, bfloat16): time per image of our `LatentDiffusionPipeline` and diffusers'
   `StableDiffusionPipeline` over the same modules (SDPA attention, DDIM, guidance 7.5), alternating calls,
   then again after `torch.compile` of the shared UNet (its compile time reported apart);
2. training: samples/s of training/train_text2img.py against diffusers' train_text_to_image.py on an
   SD-1.5-sized UNet and VAE (benchmarks/bench_training.py --peer, the same folder, data and settings).

Results go to DIR/gpu_suite.json and DIR/gpu_suite.md as each part finishes; a part that fails records its
error and the suite goes on; parts that would start after `--budget` seconds are skipped (and say so).
`--dry-run` runs the same code on the CPU with SD 1.5's layout 32x narrower, 64 px, 1 step, float32 and
bfloat16, and `torch.compile(backend="eager")` (dynamo without inductor), in a minute or two.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPT = "a red circle above a blue square"


class Suite:
    """Collects the parts' results and rewrites the JSON and markdown files after each one."""

    def __init__(self, out: str, budget: float, settings: dict):
        self.out, self.budget, self.start = out, budget, time.perf_counter()
        self.results = {"settings": settings, "parts": []}
        os.makedirs(out, exist_ok=True)

    def run(self, name: str, part, *args) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.budget:
            record = {"part": name, "skipped": f"budget of {self.budget:.0f} s spent ({elapsed:.0f} s)"}
        else:
            started = time.perf_counter()
            try:
                record = {"part": name, **part(*args)}
            except Exception as error:  # one failing part must not lose the others' results
                record = {"part": name, "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()[-2000:]}
            record["seconds"] = round(time.perf_counter() - started, 1)
        self.results["parts"].append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}), flush=True)
        self.write()

    def write(self) -> None:
        with open(os.path.join(self.out, "gpu_suite.json"), "w") as f:
            json.dump(self.results, f, indent=2)
        lines = ["# GPU suite results", "", f"settings: `{json.dumps(self.results['settings'])}`", "",
                 "| part | ours | diffusers | ours/diffusers | notes |", "|---|---|---|---|---|"]
        for r in self.results["parts"]:
            if "ours" in r:
                lines.append(f"| {r['part']} | {r['ours']:.4f} {r['unit']} | {r['diffusers']:.4f} {r['unit']} | "
                             f"**{r['ratio']:.2f}** | {r.get('notes', '')} |")
            else:
                lines.append(f"| {r['part']} | | | | {r.get('error') or r.get('skipped')} |")
        with open(os.path.join(self.out, "gpu_suite.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


def load_pair(folder: str, device: str, dtype):
    """Ours and diffusers' pipelines over the same modules, on `device` in `dtype`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(folder, dtype=dtype).to(device)
    theirs = StableDiffusionPipeline(vae=ours.vae, text_encoder=ours.text_encoder, tokenizer=ours.tokenizer,
                                     unet=ours.unet, scheduler=DDIMScheduler.from_config(ours.scheduler.config),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours.trace_unet = False  # eager, like every UNet over 50M parameters (dry runs too: the GPU's code path)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def image_seconds(pipe, size: int, steps: int, extra: dict) -> float:
    import torch

    start = time.perf_counter()
    pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np",
         generator=torch.Generator().manual_seed(0), **extra)  # output_type np: the result is on the host
    return time.perf_counter() - start


def alternate(ours, theirs, size: int, steps: int, repeats: int) -> tuple[float, float]:
    """Median seconds per image of each, calls alternating (a warm-up call each first)."""
    times = {"ours": [], "diffusers": []}
    for r in range(repeats + 1):
        for kind, pipe, extra in (("ours", ours, {"sampler": "ddim"}), ("diffusers", theirs, {})):
            seconds = image_seconds(pipe, size, steps, extra)
            if r:
                times[kind].append(seconds)
    return statistics.median(times["ours"]), statistics.median(times["diffusers"])


def inference_part(folder: str, opts, dtype_name: str, compiled: bool) -> dict:
    import torch

    ours, theirs = load_pair(folder, opts.device, getattr(torch, dtype_name))
    notes = f"{opts.size} px, DDIM {opts.steps} steps, w=7.5, SDPA"
    if compiled:
        started = time.perf_counter()
        ours.unet.compile(backend=opts.compile_backend)  # in place: both pipelines call the same compiled UNet
        image_seconds(ours, opts.size, opts.steps, {"sampler": "ddim"})
        notes += f", torch.compile({opts.compile_backend}) of the shared UNet, first call {time.perf_counter() - started:.1f} s"
    a, b = alternate(ours, theirs, opts.size, opts.steps, opts.repeats)
    return dict(ours=a, diffusers=b, ratio=a / b, unit="s/image", notes=notes)


def training_part(opts) -> dict:
    from bench_training import compare_with_peer

    peer = argparse.Namespace(unet=opts.train_unet, resolution=opts.train_resolution, batch_size=opts.train_batch,
                              images=max(4 * opts.train_batch, 8), short=opts.train_skip, long=opts.train_steps,
                              rounds=1, threads=os.cpu_count() if opts.device != "cpu" else 1, ours_flags="",
                              peer_flags="", mixed_precision=opts.train_precision, cpu_time=False)
    result = compare_with_peer(peer)
    return dict(ours=result["ours_samples_per_s"], diffusers=result["peer_samples_per_s"], ratio=result["ratio"],
                unit="samples/s", notes=f"{opts.train_unet} UNet, {opts.train_resolution} px, batch "
                                        f"{opts.train_batch}, {opts.train_precision}, vs train_text_to_image.py "
                                        "(ratio: our samples/s over theirs)")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_suite_results")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which no new part starts (default: 450; none with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU, tiny sizes")
    parser.add_argument("--skip-training", action="store_true")
    opts = parser.parse_args(argv)
    if opts.dry_run:
        opts.update = dict(device="cpu", dtypes=("float32", "bfloat16"), size=64, steps=1, repeats=1, width_divisor=32,
                           compile_backend="eager", train_unet="sd15/32", train_resolution=64, train_batch=2,
                           train_skip=1, train_steps=3, train_precision="no")
    else:
        opts.update = dict(device="cuda", dtypes=("float16", "bfloat16"), size=512, steps=20, repeats=3,
                           width_divisor=1, compile_backend="inductor", train_unet="sd15", train_resolution=256,
                           train_batch=8, train_skip=3, train_steps=13, train_precision="bf16")
    for key, value in opts.update.items():
        setattr(opts, key, value)
    if opts.budget is None:
        opts.budget = float("inf") if opts.dry_run else 450.0
    return opts


def main(argv=None) -> None:
    opts = parse(argv)
    from sd_configs import sd15_folder

    suite = Suite(opts.out, opts.budget, {k: v for k, v in opts.update.items()})
    with tempfile.TemporaryDirectory() as tmp:
        folder = sd15_folder(os.path.join(tmp, "sd15"), width_divisor=opts.width_divisor)
        for dtype in opts.dtypes:
            for compiled in (False, True):
                name = f"inference {dtype}{' compiled' if compiled else ''}"
                suite.run(name, inference_part, folder, opts, dtype, compiled)
    if not opts.skip_training:
        suite.run("training", training_part, opts)
    print(f"results: {os.path.join(opts.out, 'gpu_suite.md')}")


if __name__ == "__main__":
    main()
