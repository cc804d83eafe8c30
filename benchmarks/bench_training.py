"""Training throughput: samples/s from the latent cache vs encoding every step; or ours vs diffusers' script.

    python benchmarks/bench_training.py [--steps 30] [--images 64] [--batch_size 8] [--resolution 64]
    python benchmarks/bench_training.py --peer [--unet tiny|small|sd15] [--resolution 64] [--batch_size 16]
                                        [--short 2] [--long 12] [--rounds 3] [--threads 1] [--ours_flags "..."]

`--peer`: our training/train_text2img.py against diffusers' train_text_to_image.py
(../shared/peers/diffusers/, run through ../shared/peers/run_peer.py), each as its own command line on
the same SD folder (built from config: `--unet` picks the UNet), the same image folder with captions,
resolution, batch, seed and `--long` steps, fp32, no validation, no checkpoints but ours at the end. The
time per step of each comes from the run's own progress bar: the driver timestamps every update of the
tqdm "k/N" counter on the child's stderr, and takes (t_N − t_short) / (N − short), which leaves out imports,
loading, our cache build, the first `--short` (warm-up) steps and the final save. With `--cpu_time` the
child's CPU seconds (/proc/PID/stat) between those updates are used instead of wall seconds: on a loaded
machine with `--threads 1` that counts the work of each step and not the time other jobs held the core. (A difference of a long
and a short run's wall times does the same in principle, but on the loaded 2-core box start-up jitter of
tens of seconds swamped it: it gave negative step times.) Runs alternate ours/peer (the order flips every
round); the medians over `--rounds` are reported. Prints a markdown line for RESULTS.md.

Without `--peer`:

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sd_configs


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

    sys.path.insert(0, REPO)  # training/ is a folder of scripts beside the library, not part of it
    from latent_diffusion.training import train_text2img as T
    from latent_diffusion.training.args import parse_args
    from latent_diffusion.training.settings import training_settings
    from latent_diffusion.training.batches import step_groups
    from latent_diffusion.training.checkpointing import TrainingState

    from latent_diffusion.diffusion.losses import DenoisingLoss

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = training_settings(parse_args(train_args))
    accelerator = T.make_accelerator(args)
    models = T.load_models(args, accelerator)
    started = time.perf_counter()
    data = T.load_training_data(args, accelerator, models)
    prepare = time.perf_counter() - started
    optimizer, lr_scheduler = T.make_optimizer(args, accelerator, models.unet, 10**6)
    unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    trainee = T.Trainee(unet, optimizer, lr_scheduler, None)
    loss_fn = DenoisingLoss(models.schedule, noise_offset=args.noise_offset)
    state, done, samples, timed = TrainingState(), 0, 0, 0.0
    while done < warmup + steps:
        loader = T.epoch_loader(args, accelerator, data, state)
        tick = time.perf_counter()
        for group in step_groups(loader, args.optim.gradient_accumulation_steps):  # data loading is inside the timing
            T.train_step(args, accelerator, models, trainee, loss_fn, group, T.step_generator(args.optim.seed, done, 0))
            tock = time.perf_counter()
            if done >= warmup:
                timed += tock - tick
                samples += sum(len(b["index"]) for b in group)
            done, tick = done + 1, tock
            if done >= warmup + steps:
                break
        state.epoch += 1
    return samples / timed, prepare


# ---------------------------------------------------------------- ours vs diffusers' train_text_to_image.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(os.path.dirname(REPO), "shared", "peers")  # ../shared/peers from the checkout
UNETS = {  # UNet2DConditionModel settings on top of latent_diffusion.tiny's; cross_attention_dim stays 32
    "tiny": {},
    "small": dict(block_out_channels=(32, 64, 128), layers_per_block=2, attention_head_dim=8, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


def peer_folder(folder: str, unet: str) -> None:
    """A diffusers SD folder: latent_diffusion.tiny's VAE, text encoder and tokenizer with the `--unet` UNet,
    the embedded default model as it ships (`default`), or SD 1.5's UNet and VAE (`sd15`, random weights;
    `sd15/32`: every block 32x narrower, for dry runs)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from latent_diffusion.tiny import tiny_components, tiny_unet_config

    if unet == "default":  # the embedded Shapes model as it ships: its own UNet, VAE, text encoder and tokenizer
        import shutil

        from latent_diffusion.formats.assets import default_model_path

        shutil.copytree(default_model_path(), folder)
        return
    if unet.startswith("sd15"):  # SD 1.5's UNet and VAE (benchmarks/sd_configs.py); "sd15/32": 32x narrower
        from sd_configs import sd15_folder

        sd15_folder(folder, width_divisor=int(unet.partition("/")[2] or 1))
        return
    parts = tiny_components()
    if UNETS[unet]:
        parts["unet"] = UNet2DConditionModel(**{**tiny_unet_config(), **UNETS[unet]})
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def training_command(kind: str, opts, model: str, data: str, out: str, steps: int) -> list[str]:
    """The command line of one run of our script or the peer's, with the same settings."""
    common = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
              "--resolution", str(opts.resolution), "--train_batch_size", str(opts.batch_size),
              "--max_train_steps", str(steps), "--checkpointing_steps", str(10**6), "--seed", "0",
              "--lr_warmup_steps", "0", "--center_crop", "--random_flip", "--mixed_precision", opts.mixed_precision]
    if kind == "ours":
        script = os.path.join(REPO, "training", "train_text2img.py")
        return [sys.executable, script, *common, "--report_to", "none", *opts.ours_flags.split()]
    peer = os.path.join(PEERS, "diffusers", "train_text_to_image.py")
    return [sys.executable, os.path.join(PEERS, "run_peer.py"), peer, *common, "--report_to", "tensorboard",
            *opts.peer_flags.split()]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by process `pid` (Linux /proc; 0 elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def step_times(command: list[str], env: dict) -> list[tuple[int, float, float]]:
    """Run a training command; (steps done, wall seconds since start, the child's CPU seconds) at every update
    of its tqdm progress bar."""
    import re
    import subprocess

    pattern = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "k/N [elapsed<remaining" field
    start, seen, text = time.perf_counter(), [], ""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    while chunk := process.stderr.read1(4096) if hasattr(process.stderr, "read1") else process.stderr.read(1):
        now, text = time.perf_counter() - start, (text + chunk.decode(errors="replace"))[-20000:]
        for match in pattern.finditer(text[-len(chunk) - 40:]):
            done, total = int(match.group(1)), int(match.group(2))
            if total == int(command[command.index("--max_train_steps") + 1]) and (not seen or done > seen[-1][0]):
                seen.append((done, now, cpu_seconds(process.pid)))
    if process.wait() != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{text[-3000:]}")
    return seen


def seconds_per_step(seen: list[tuple[int, float, float]], skip: int, clock: int) -> float:
    """Mean time of the steps after the first `skip` (warm-up) from the progress-bar timestamps: wall time
    (clock 1) or the child's CPU time (clock 2)."""
    after = [row for row in seen if row[0] >= skip]
    first, last = after[0], after[-1]
    if last[0] <= first[0]:
        raise SystemExit(f"too few progress updates after step {skip}: {seen}")
    return (last[clock] - first[clock]) / (last[0] - first[0])


def compare_with_peer(opts) -> dict:
    """Per-step time of ours and of diffusers' script from their progress bars, alternating runs; medians."""
    import statistics

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(opts.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    per_step, wall = {"ours": [], "diffusers": []}, {"ours": [], "diffusers": []}
    with tempfile.TemporaryDirectory() as tmp:
        model, data = os.path.join(tmp, "model"), os.path.join(tmp, "data")
        peer_folder(model, opts.unet)
        make_data(data, opts.images, opts.resolution + opts.resolution // 4)
        for r in range(opts.rounds):
            order = ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")
            for kind in order:
                out = os.path.join(tmp, f"{kind}-{r}")
                seen = step_times(training_command(kind, opts, model, data, out, opts.long), env)
                per_step[kind].append(seconds_per_step(seen, opts.short, 2 if opts.cpu_time else 1))
                wall[kind].append(seconds_per_step(seen, opts.short, 1))
                print(f"round {r} {kind}: {per_step[kind][-1]:.3f} {'CPU ' if opts.cpu_time else ''}s/step, wall "
                      f"{wall[kind][-1]:.3f} s/step (steps {opts.short}..{seen[-1][0]}, run {seen[-1][1]:.0f} s)",
                      flush=True)
    ours, theirs = (statistics.median(per_step[k]) for k in ("ours", "diffusers"))
    ratio = theirs / ours  # = our samples/s over theirs
    command = "python benchmarks/bench_training.py " + " ".join(sys.argv[1:])
    print(f"ours {opts.batch_size / ours:.2f} samples/s ({ours:.3f} s/step), diffusers' train_text_to_image.py "
          f"{opts.batch_size / theirs:.2f} samples/s ({theirs:.3f} s/step): ours/peer {ratio:.2f}x")
    clock = ", CPU time" if opts.cpu_time else ""
    clock += f", --mixed_precision {opts.mixed_precision}" if opts.mixed_precision != "no" else ""
    print(f"| {opts.unet} UNet, {opts.resolution} px, batch {opts.batch_size}, {opts.threads} thread(s){clock}, "
          f"{opts.ours_flags or 'defaults'} | {opts.batch_size / ours:.2f} | {opts.batch_size / theirs:.2f} | "
          f"**{ratio:.2f}x** | `{command.strip()}` |")
    return dict(ours_samples_per_s=opts.batch_size / ours, peer_samples_per_s=opts.batch_size / theirs, ratio=ratio,
                ours_s_per_step=per_step["ours"], peer_s_per_step=per_step["diffusers"])


def unet_choice(value: str) -> str:
    """--unet: a UNETS name, default, sd15, or sd15/N with N a power of two that divides SD 1.5's widths."""
    name, _, divisor = value.partition("/")
    if value in UNETS or value == "default" or (name == "sd15" and (not divisor or divisor in ("2", "4", "8", "16", "32"))):
        return value
    raise argparse.ArgumentTypeError(f"--unet must be one of {', '.join(UNETS)}, default, sd15, sd15/N (N in 2..32), got {value!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each path; best kept")
    parser.add_argument("--peer", action="store_true", help="ours against diffusers' train_text_to_image.py")
    parser.add_argument("--unet", default="tiny", type=unet_choice,
                        help="--peer: the UNet of the SD folder: tiny, small, default (the embedded Shapes model), or sd15 / sd15/N (SD 1.5's UNet and "
                             "VAE, every block N times narrower)")
    parser.add_argument("--short", type=int, default=2, help="--peer: warm-up steps left out of the timing")
    parser.add_argument("--long", type=int, default=12, help="--peer: steps of each run")
    parser.add_argument("--threads", type=int, default=1, help="--peer: OMP_NUM_THREADS of every run")
    parser.add_argument("--ours_flags", default="", help="--peer: extra flags of our script, e.g. '--compile'")
    parser.add_argument("--peer_flags", default="", help="--peer: extra flags of the peer script")
    parser.add_argument("--cpu_time", action="store_true",
                        help="--peer: time steps by the child's CPU time, not wall time (with --threads 1 on a "
                             "loaded CPU: what other jobs take is not counted)")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"), help="--peer: both scripts")
    opts = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if opts.peer:
        if opts.long <= opts.short:
            parser.error("--long must be greater than --short")
        compare_with_peer(opts)
        return
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
