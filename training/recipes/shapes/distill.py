"""The embedded default at few steps: latent consistency distillation of latent_diffusion/default_model into
latent_diffusion/default_model_lcm (the model `from_pretrained("default-lcm")` and `--model default-lcm` load).

    OMP_NUM_THREADS=1 nice -n 10 python training/recipes/shapes/distill.py --work_dir WORK

Stages, each resumable and skipped when its output is complete:

    data      WORK/data/train-64: DATA_IMAGES Shapes training images (the recipe's exporter)
    distill   training/distill_lcm.py with DISTILL_FLAGS into WORK/lcm, resumed from its latest checkpoint
    assemble  --output_model_dir: the distilled UNet in float16 and its LCMScheduler beside the teacher's own
              VAE, text encoder and tokenizer files (copied byte for byte) and its model_index.json (the
              scheduler entry changed); the steps chosen
              by measurement (below) in generation_config.json; distill_recipe.json (these flags) and
              README.md (the model card, with the measurements and a sample grid)

The steps are measured, not assumed: LCM sampling at guidance 1 for each of MEASURED_STEPS, scored on the
teacher recipe's prompts and seeds (`evaluation_prompts(500, seed=2)`, seeds 10000 + i, the teacher card's
0.900), and one image timed against the teacher's defaults in the same process, interleaved, in both regimes
of the pipeline's UNet: eager (what a single call or `generate` gets) and traced (what a long session gets
after TRACE_AFTER_CALLS calls); a step count's time ratio is the larger of the two. The default is the fewest
steps whose adherence reaches the teacher's recorded figure within TIME_TARGET of its time; when no step count
does, the most adherent within TIME_TARGET, and the card says the target is missed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from latent_diffusion.formats.atomic import atomic_folder, write_text_atomic
from latent_diffusion.training.recipes.shapes.common import write_json
from latent_diffusion.pipelines.text2img import TRACE_AFTER_CALLS
from latent_diffusion.training.recipes.shapes.recipe import GRID_PROMPTS, REPO, generate

TEACHER_DIR = REPO / "latent_diffusion" / "default_model"
OUTPUT_DIR = REPO / "latent_diffusion" / "default_model_lcm"
SHARED_FILES = ("vae", "text_encoder", "tokenizer")  # the teacher's, byte for byte
DATA_IMAGES = 8000
DISTILL_FLAGS = {  # training/distill_lcm.py's flags for the shipped model
    "max_train_samples": 8000, "resolution": 64, "full_unet": True, "train_batch_size": 16,
    "max_train_steps": 4800, "learning_rate": 2e-4, "lr_scheduler": "cosine", "w_min": 7.0, "w_max": 7.0,
    "num_ddim_timesteps": 25, "average_decay": 0.998, "checkpointing_steps": 400, "seed": 0,
}
MEASURED_STEPS = (1, 2, 4, 6, 8)
TIME_TARGET = 0.3  # at most this fraction of the teacher's seconds per image (the target)
TIMING_REPEATS = 7
REGIMES = ("eager", "traced")  # the UNet as one call runs it, and as a long session does


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", required=True, help="data, the distillation run and its checkpoints")
    p.add_argument("--output_model_dir", default=str(OUTPUT_DIR), help="where the few-step model is assembled")
    p.add_argument("--eval_prompts", type=int, default=500, help="prompts of the adherence measurement")
    return p.parse_args(argv)


def flag_list(flags: dict) -> list[str]:
    """{"full_unet": True, "seed": 0} -> ["--full_unet", "--seed", "0"]."""
    out = []
    for name, value in flags.items():
        out += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return out


def distill_command(data: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "training" / "distill_lcm.py"), "--pretrained_model_name_or_path",
            str(TEACHER_DIR), "--train_data_dir", str(data), "--output_dir", str(out), "--cache_dir",
            str(out.parent / "cache"), "--report_to", "none", "--checkpoint_on_stop", "--resume_from_checkpoint",
            "latest", *flag_list(DISTILL_FLAGS)]


def run_distillation(work: Path) -> Path:
    """WORK/lcm, the distillation's output folder (skipped when its model is complete)."""
    from latent_diffusion.shapes import export_imagefolder

    data, out = work / "data" / "train-64", work / "lcm"
    if not (data / "metadata.jsonl").is_file() or sum(1 for _ in (data / "metadata.jsonl").open()) != DATA_IMAGES:
        export_imagefolder(data, DATA_IMAGES, size=64, seed=0, split="train", overwrite=True)
    if not (out / "unet" / "config.json").is_file():
        subprocess.run(distill_command(data, out), check=True, cwd=str(REPO))
    return out


def quiet_pipeline(folder: Path):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adherence_by_steps(student, prompts: list[str]) -> dict[int, dict]:
    """The Shapes report of LCM sampling at guidance 1 for each of MEASURED_STEPS (seeds 10000 + i)."""
    from latent_diffusion.shapes import score_images

    return {k: score_images(generate(student, prompts, k, 1.0, "lcm", seed=10_000), prompts) for k in MEASURED_STEPS}


def seconds_by_steps(student, traced: bool) -> dict[str, float]:
    """Median seconds of one image: the teacher at its defaults and the student at each step count, interleaved,
    with both UNets `traced` from the first call or eager throughout."""
    teacher = quiet_pipeline(TEACHER_DIR)
    teacher.trace_unet = student.trace_unet = traced
    runs = {"teacher": (teacher, teacher.generation_defaults)}
    runs.update({str(k): (student, {"sampler": "lcm", "num_inference_steps": k, "guidance_scale": 1.0})
                 for k in MEASURED_STEPS})
    times = {name: [] for name in runs}
    for repeat in range(TIMING_REPEATS + 1):  # the first round warms up
        for name, (pipe, s) in runs.items():
            started = time.perf_counter()
            generate(pipe, [GRID_PROMPTS[0]], s["num_inference_steps"], s["guidance_scale"], s["sampler"])
            if repeat:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def choose_steps(adherence: dict[int, float], ratio: dict[int, float], teacher_adherence: float) -> tuple[int, bool]:
    """(steps, whether the targets hold): the fewest steps at ≥ the teacher's adherence and ≤ TIME_TARGET of its
    time; else the most adherent step count within TIME_TARGET (the fewest steps when none is)."""
    fast = [k for k in sorted(adherence) if ratio[k] <= TIME_TARGET]
    holding = [k for k in fast if adherence[k] >= teacher_adherence]
    if holding:
        return holding[0], True
    return (max(fast, key=lambda k: (adherence[k], -k)) if fast else min(adherence)), False


def copy_shared_files(out: Path) -> None:
    """The teacher's VAE, text encoder and tokenizer, and its model_index.json naming LCMScheduler instead."""
    for name in SHARED_FILES:
        shutil.copytree(TEACHER_DIR / name, out / name)
    index = json.loads((TEACHER_DIR / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    write_json(out / "model_index.json", index)


def assemble(args, trained: Path, out: Path) -> dict:
    """The shipped folder and its measurements (distill_recipe.json's "measured")."""
    import torch
    from diffusers import UNet2DConditionModel
    from latent_diffusion.shapes import evaluation_prompts

    teacher_metrics = json.loads((TEACHER_DIR / "recipe_metrics.json").read_text())
    with atomic_folder(out) as tmp:
        copy_shared_files(tmp)
        UNet2DConditionModel.from_pretrained(str(trained), subfolder="unet").to(torch.float16).save_pretrained(
            str(tmp / "unet"))
        shutil.copytree(trained / "scheduler", tmp / "scheduler")  # distill_lcm's: the teacher's, on its N and s
        prompts = [p for p, _ in evaluation_prompts(args.eval_prompts, seed=2)]
        student = quiet_pipeline(tmp)
        reports = adherence_by_steps(student, prompts)
        seconds = {regime: seconds_by_steps(student, regime == "traced") for regime in REGIMES}
        adherence = {k: r["overall"] for k, r in reports.items()}
        ratio = {k: max(s[str(k)] / s["teacher"] for s in seconds.values()) for k in MEASURED_STEPS}
        steps, holds = choose_steps(adherence, ratio, teacher_metrics["adherence"]["overall"])
        defaults = {"sampler": "lcm", "num_inference_steps": steps, "guidance_scale": 1.0}
        write_json(tmp / "generation_config.json", defaults)
        measured = {"teacher_adherence": teacher_metrics["adherence"]["overall"], "adherence": adherence,
                    "counts": {k: r["counts"]["overall"] for k, r in reports.items()}, "seconds": seconds,
                    "time_ratio": ratio, "steps": steps, "targets_hold": holds, "threads": torch.get_num_threads()}
        write_json(tmp / "distill_recipe.json", {"distill_flags": DISTILL_FLAGS, "data_images": DATA_IMAGES,
                                                 "measured": measured})
        write_sample_grid(student, tmp, defaults)
        write_text_atomic(tmp / "README.md", model_card(measured))
    return measured


def write_sample_grid(student, folder: Path, defaults: dict) -> None:
    from latent_diffusion.training.validation import image_grid

    grid = image_grid(generate(student, list(GRID_PROMPTS), defaults["num_inference_steps"], 1.0, "lcm"), columns=4)
    grid.resize((grid.width * 2, grid.height * 2), resample=0).save(folder / "sample_grid.png")


def model_card(m: dict) -> str:
    rows = "\n".join(f"| {k} | {m['adherence'][k]:.3f} ({round(m['adherence'][k] * m['counts'][k])}/{m['counts'][k]}) "
                     f"| {m['seconds']['eager'][str(k)]:.3f} | {m['seconds']['traced'][str(k)]:.3f} "
                     f"| {m['time_ratio'][k]:.2f} |" for k in MEASURED_STEPS)
    verdict = (f"{m['steps']} steps keep the teacher's adherence within {TIME_TARGET}× its time." if m["targets_hold"]
               else f"No step count reaches the teacher's {m['teacher_adherence']:.3f} within {TIME_TARGET}× its time; "
                    f"{m['steps']} steps are the most adherent that fit.")
    flags = " ".join(flag_list(DISTILL_FLAGS))
    placement = ("`from_pretrained()` with no argument loads this model; the 20-step teacher is `\"default-20-step\"`."
                 if m["targets_hold"] else 'The 20-step teacher stays `from_pretrained()` / `"default-20-step"`.')
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
license: apache-2.0
tags: [text-to-image, latent-diffusion, latent-consistency-model, lcm, shapes]
base_model: latent_diffusion/default_model
---

# latent_diffusion embedded default, few steps: Shapes LCM

The embedded Shapes model (`latent_diffusion/default_model`, its card has the data and the teacher's
recipe) distilled into a latent consistency model (Luo et al. 2023). The VAE, text encoder and tokenizer
are the teacher's files; the UNet is distilled and samples with `sampler="lcm"` at guidance 1 (no
classifier-free guidance: one UNet call per step).

```python
from latent_diffusion import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained("default-lcm")       # generate --model default-lcm
image = pipe("a red circle above a blue square").images[0]           # {m['steps']} LCM steps
```

It loads in diffusers as any LCM: `StableDiffusionPipeline.from_pretrained(folder)` (its scheduler is
`LCMScheduler`), `guidance_scale=1.0`. {placement}

![samples](sample_grid.png)

## Measured (CPU, {m['threads']} thread(s))

Strict Shapes adherence on the teacher recipe's 400 held-in prompts and seeds (teacher: {m['teacher_adherence']:.3f}
at 20 DDIM steps, guidance 4); seconds for one image, the teacher's defaults timed in the same process
({m['seconds']['eager']['teacher']:.3f} s eager, {m['seconds']['traced']['teacher']:.3f} s traced), interleaved,
median of {TIMING_REPEATS}. Eager is the UNet as a single call or `generate` runs it; traced, as a long session
runs it after its first {TRACE_AFTER_CALLS} UNet calls. The ratio is the larger of the two regimes'.

| LCM steps | adherence | s/image, eager | s/image, traced | × teacher's time |
|---|---|---|---|---|
{rows}

{verdict}

## How it was made

`training/recipes/shapes/distill.py --work_dir WORK`: {DATA_IMAGES} Shapes training images, then

    python training/distill_lcm.py --pretrained_model_name_or_path latent_diffusion/default_model \\
        --train_data_dir WORK/data/train-64 {flags}

(`distill_recipe.json` holds these flags and the measurements; `tests/test_default_lcm.py` checks the
shipped files against them). The teacher's guidance in the targets is w + 1 = {DISTILL_FLAGS['w_max'] + 1:g};
the saved UNet is the slow average (`--average_decay`) of the student, not the target network.
"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    work = Path(args.work_dir)
    trained = run_distillation(work)
    measured = assemble(args, trained, Path(args.output_model_dir))
    print(f"[distill] assembled {args.output_model_dir}: {measured['steps']} steps, adherence "
          f"{measured['adherence'][measured['steps']]:.3f}, targets hold: {measured['targets_hold']}", flush=True)


if __name__ == "__main__":
    main()
