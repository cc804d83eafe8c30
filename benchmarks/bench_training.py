"""Training throughput: samples/s from the latent cache vs encoding images and captions every step, in one run.

    python benchmarks/bench_training.py [--steps 30] [--images 64] [--batch_size 8] [--resolution 64]

Both paths run the same training step (training/train_text2img.py's
`train_step`) on the same tiny model and data; only where z_0 and the text
embeddings come from differs. The cache is built first and its build time is
reported separately (it is paid once per dataset). The paths alternate
`--rounds` times and each keeps its best figure, so a busy machine hurts less. Prints a markdown line for
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image


def make_data(folder: str, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    words = ["a red circle", "a blue square above a green triangle", "a cat on a sofa", "a yellow triangle"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": words[i % len(words)]}) + "\n")


def measure(train_args: list[str], steps: int, warmup: int) -> tuple[float, float]:
    """(samples/s over `steps` timed steps, seconds spent preparing data) for one path."""
    from accelerate.state import AcceleratorState, GradientState

    from latent_diffusion.training import train_text2img as T
    from latent_diffusion.training.args import parse_args
    from latent_diffusion.training.batches import step_groups
    from latent_diffusion.training.checkpointing import TrainingState
    from latent_diffusion.losses import DenoisingLoss

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = parse_args(train_args)
    accelerator = T.make_accelerator(args)
    models = T.load_models(args, accelerator)
    started = time.perf_counter()
    data = T.load_training_data(args, accelerator, models)
    prepare = time.perf_counter() - started
    optimizer, lr_scheduler = T.make_optimizer(args, accelerator, models.unet, 10**6)
    unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    loss_fn = DenoisingLoss(models.schedule.prediction_type)
    state, done, samples, timed = TrainingState(), 0, 0, 0.0
    while done < warmup + steps:
        loader = T.epoch_loader(args, accelerator, data, state)
        tick = time.perf_counter()
        for group in step_groups(loader, args.gradient_accumulation_steps):  # data loading is inside the timing
            T.train_step(args, accelerator, models, unet, optimizer, lr_scheduler, loss_fn, group,
                         T.step_generator(args.seed, done, 0))
            tock = time.perf_counter()
            if done >= warmup:
                timed += tock - tick
                samples += sum(len(b["index"]) for b in group)
            done, tick = done + 1, tock
            if done >= warmup + steps:
                break
        state.epoch += 1
    return samples / timed, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each path; best kept")
    opts = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    from diffusers import StableDiffusionPipeline

    from latent_diffusion.tiny import tiny_components

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data")
        StableDiffusionPipeline(**tiny_components(), safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(model)
        make_data(data, opts.images, opts.resolution + opts.resolution // 4)
        common = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir",
                  os.path.join(tmp, "out"), "--resolution", str(opts.resolution), "--train_batch_size",
                  str(opts.batch_size), "--report_to", "none", "--random_flip", "--center_crop"]
        runs = {"cached": [], "on_the_fly": []}
        for _ in range(opts.rounds):  # alternate the paths, keep each one's best: robust to a busy machine
            runs["cached"].append(measure(common, opts.steps, opts.warmup))
            runs["on_the_fly"].append(measure(common + ["--no_cache"], opts.steps, opts.warmup))
        cached, build = max(r[0] for r in runs["cached"]), runs["cached"][0][1]
        on_the_fly, scan = max(r[0] for r in runs["on_the_fly"]), runs["on_the_fly"][0][1]
    ratio = cached / on_the_fly
    command = "python benchmarks/bench_training.py " + " ".join(sys.argv[1:])
    print(f"cache build: {build:.2f}s for {opts.images} images (once); on-the-fly image check: {scan:.2f}s")
    print(f"cached: {cached:.1f} samples/s, on the fly: {on_the_fly:.1f} samples/s, ratio {ratio:.2f}x")
    print(f"| training throughput, tiny SD {opts.resolution}px, batch {opts.batch_size}, {torch.get_num_threads()} "
          f"CPU threads | cache {cached:.1f} samples/s vs on-the-fly {on_the_fly:.1f} samples/s | "
          f"**{ratio:.2f}x** | `{command.strip()}` |")


if __name__ == "__main__":
    main()
