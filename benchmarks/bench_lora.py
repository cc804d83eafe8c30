"""LoRA training against full fine-tuning and against diffusers' train_text_to_image_lora.py, in one run.

    python benchmarks/bench_lora.py [--steps 10 200] [--images 32] [--batch_size 8] [--rank 8] [--rounds 3]

All three train the embedded default model (saved as float32 into a temporary folder, so every script
reads the same weights) on the same Shapes images, resolution 64 and batch size, on the CPU, one process:

    ours, LoRA        training/train_text2img.py --lora_rank R
    ours, full        training/train_text2img.py (the whole UNet)
    diffusers, LoRA   ../shared/peers/diffusers/train_text_to_image_lora.py --rank R (through run_peer.py)

Each is run twice per round, for the two step counts of `--steps`; samples/s = (difference in steps ×
batch) / (difference in wall time), so start-up, loading and caching cancel out; the rounds alternate the
three runs and the median round is reported. Peak memory is the child
process's maximum resident set (os.wait4), of the longer run. Also printed: the LoRA file's size against
the UNet's weights file. The machine is shared: only the ratios within one run mean anything.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers")


def run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process, reaped with os.wait4 for its own ru_maxrss (KiB)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            log.seek(0)
            raise RuntimeError(f"{command[:3]} failed:\n{log.read()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def commands(model: str, data: str, out: str, steps: int, batch: int, rank: int) -> dict[str, list[str]]:
    common = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
              "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", "1e-4",
              "--lr_warmup_steps", "0", "--report_to", "tensorboard", "--seed", "0", "--dataloader_num_workers", "0"]
    ours = [sys.executable, os.path.join(ROOT, "training", "train_text2img.py"), *common,
            "--checkpointing_steps", "100000"]
    peer = [sys.executable, os.path.join(PEERS, "run_peer.py"),
            os.path.join(PEERS, "diffusers", "train_text_to_image_lora.py"), *common, "--rank", str(rank),
            "--caption_column", "text", "--checkpointing_steps", "100000"]
    return {"ours, LoRA": ours + ["--lora_rank", str(rank), "--output_dir", f"{out}/ours-lora-{steps}"],
            "ours, full fine-tuning": ours + ["--output_dir", f"{out}/ours-full-{steps}"],
            "diffusers LoRA script": peer + ["--output_dir", f"{out}/peer-lora-{steps}"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs=2, default=[10, 200])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from latent_diffusion import LatentDiffusionPipeline
    from latent_diffusion.shapes import export_imagefolder

    work = tempfile.mkdtemp(prefix="bench-lora-")
    model = os.path.join(work, "model")
    LatentDiffusionPipeline.from_pretrained().save_pretrained(model)  # float32 copy of the embedded default
    data = str(export_imagefolder(os.path.join(work, "data"), args.images, size=64, seed=0))
    rates: dict[str, list[float]] = {}
    peak: dict[str, float] = {}
    extra = (args.steps[1] - args.steps[0]) * args.batch_size
    for round_ in range(args.rounds):
        runs: dict[str, list[tuple[float, float]]] = {}
        for steps in args.steps:
            for name, command in commands(model, data, work, steps, args.batch_size, args.rank).items():
                runs.setdefault(name, []).append(run(command))
                print(f"round {round_}: {name}: {steps} steps {runs[name][-1][0]:.1f} s", file=sys.stderr)
        for name, (short, long) in runs.items():
            rates.setdefault(name, []).append(extra / (long[0] - short[0]))
            peak[name] = max(peak.get(name, 0.0), long[1])
    for name, values in rates.items():
        print(f"{name}: samples/s per round " + ", ".join(f"{v:.1f}" for v in values), file=sys.stderr)
    rates = {name: statistics.median(values) for name, values in rates.items()}
    peer = rates["diffusers LoRA script"]
    print(f"| run | samples/s | × diffusers LoRA | peak RSS MiB |\n|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / peer:.2f} | {peak[name]:.0f} |")
    lora_file = os.path.join(work, f"ours-lora-{args.steps[1]}", "pytorch_lora_weights.safetensors")
    unet_file = os.path.join(model, "unet", "diffusion_pytorch_model.safetensors")
    print(f"\nLoRA file (rank {args.rank}) {os.path.getsize(lora_file) / 2**20:.3f} MiB, UNet weights "
          f"{os.path.getsize(unet_file) / 2**20:.2f} MiB: ratio {os.path.getsize(lora_file) / os.path.getsize(unet_file):.4f}")


if __name__ == "__main__":
    main()
