"""Peak memory of one generation, ours against diffusers' StableDiffusionPipeline with the same weights.

    python benchmarks/bench_memory.py [--model PATH] [--size S] [--steps 20] [--sampler dpm++] [--guidance 7.5]
                                      [--batch 1] [--device cpu] [--threads N] [--attention_slicing] [--vae_tiling]

Each pipeline runs in its own fresh process (memory counters are per process): import, load, one untimed
warm-up generation, then one measured generation through `latent_diffusion.evaluation.measure`:

- CPU: the process's resident set size, sampled every 2 ms, and the kernel's lifetime peak (approximate;
  see `latent_diffusion/evaluation/resources.py`). "peak" is the peak while generating, "loaded" the RSS after
  loading, "+ over loaded" their difference (what generating adds to the loaded model, warm-up caches included),
  "+ over just before the call" the part above what was resident after the warm-up.
- CUDA: `torch.cuda.max_memory_allocated` (tensors only); "loaded" is then the memory allocated after loading.

`--attention_slicing` (diffusers' `pipe.enable_attention_slicing()`, one head group at a time) and
`--vae_tiling` (`pipe.vae.enable_tiling()`, the decode in overlapping tiles) apply to both pipelines.
Without --model a tiny SD folder is built from config. Prints a markdown line for benchmarks/RESULTS.md with
the ratio ours/diffusers of what generating adds over the loaded model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MIB = 1024 * 1024
PROMPT = "a red circle above a blue square"
PEER_SCHEDULERS = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}


def load(kind: str, model: str, sampler: str, device: str, slicing: bool = False, tiling: bool = False):
    """(pipeline on `device`, extra call arguments), with attention slicing / VAE tiling if asked."""
    if kind == "ours":
        from latent_diffusion.pipelines import LatentDiffusionPipeline

        pipe, extra = LatentDiffusionPipeline.from_pretrained(model).to(device), {"sampler": sampler}
    else:
        import diffusers

        pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, safety_checker=None,
                                                                 requires_safety_checker=False)
        pipe.scheduler = getattr(diffusers, PEER_SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
        pipe, extra = pipe.to(device), {}
    if slicing:
        pipe.enable_attention_slicing()
    if tiling:
        pipe.vae.enable_tiling()
    return pipe, extra


def loaded_bytes(device: str) -> int:
    import torch

    from latent_diffusion.evaluation.resources import current_rss_bytes

    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device)
    return current_rss_bytes() or 0


def worker(args: argparse.Namespace) -> None:
    """In this fresh process: load, warm up, measure one generation; print JSON."""
    import torch

    from latent_diffusion.evaluation import measure

    pipe, extra = load(args.worker, args.model, args.sampler, args.device, args.attention_slicing, args.vae_tiling)
    pipe.set_progress_bar_config(disable=True)
    loaded = loaded_bytes(args.device)

    def generate():
        pipe([PROMPT] * args.batch, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size,
             width=args.size, generator=torch.Generator().manual_seed(0), output_type="np", **extra)

    m = measure(generate, warmup=1, repeats=1, device=args.device)
    print(json.dumps(dict(loaded=loaded, peak=m.peak_bytes, extra=m.peak_increase_bytes, kind=m.memory_kind,
                          seconds=m.seconds)))


def run_worker(args: argparse.Namespace, kind: str) -> dict:
    size = ["--size", str(args.size)] if args.size else []
    command = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--steps", str(args.steps),
               "--sampler", args.sampler, "--guidance", str(args.guidance), "--batch", str(args.batch),
               "--device", args.device, *size, *(["--attention_slicing"] if args.attention_slicing else []),
               *(["--vae_tiling"] if args.vae_tiling else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_folder() -> str:
    from diffusers import StableDiffusionPipeline

    from latent_diffusion.tiny import tiny_components

    folder = tempfile.mkdtemp(prefix="bench-tiny-sd-")
    StableDiffusionPipeline(**tiny_components(scheduler="pndm"), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def print_results(args: argparse.Namespace, ours: dict, theirs: dict, label: str) -> None:
    for name, r in (("ours", ours), ("diffusers", theirs)):
        r["added"] = max(r["peak"] - r["loaded"], 0)
        print(f"{name:>9}: loaded {r['loaded'] / MIB:.0f} MiB, peak during generation {r['peak'] / MIB:.0f} MiB "
              f"(+{r['added'] / MIB:.1f} MiB over loaded; +{r['extra'] / MIB:.1f} MiB over just before the call) "
              f"[{r['kind']}; generation {r['seconds']:.2f} s]")
    ratio = f"{ours['added'] / theirs['added']:.2f}" if theirs["added"] else "n/a"
    command = "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:])
    print(f"| {label} | {ours['peak'] / MIB:.0f} MiB | +{ours['added'] / MIB:.1f} MiB | {theirs['peak'] / MIB:.0f} MiB "
          f"| +{theirs['added'] / MIB:.1f} MiB | **{ratio}** | `{command.strip()}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="diffusers SD folder (default: tiny components built from config)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="dpm++", choices=sorted(PEER_SCHEDULERS))
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=1, help="images per generation")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the worker processes")
    parser.add_argument("--attention_slicing", action="store_true", help="pipe.enable_attention_slicing() in both")
    parser.add_argument("--vae_tiling", action="store_true", help="pipe.vae.enable_tiling() in both")
    parser.add_argument("--worker", choices=("ours", "diffusers"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    options = "".join([", attention slicing" if args.attention_slicing else "", ", VAE tiling" if args.vae_tiling else ""])
    label = (f"{'tiny SD' if args.model is None else args.model}, {args.size or 'default'} px, batch {args.batch}, "
             f"{args.sampler} {args.steps} steps, {args.device}{options}")
    args.model = args.model or tiny_folder()
    print_results(args, run_worker(args, "ours"), run_worker(args, "diffusers"), label)


if __name__ == "__main__":
    main()
