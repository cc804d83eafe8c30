"""The Shapes recipe: build the embedded default model from nothing, the way Stable Diffusion was made.

    nice -n 10 python training/recipes/shapes/recipe.py --work_dir /work/runs/shapes

runs, each stage resumable and skipped when its output is complete:

    stage 0  text      tokenizer + CLIP text encoder, contrastive on Shapes       stage0_text.py (this folder)
    stage 1  vae       AutoencoderKL (factor 4, 4 channels) + scaling_factor      stage1_vae.py
    base               WORK/base: tokenizer, text_encoder, vae, scheduler, an untrained UNet
                       (a complete diffusers folder, which train_text2img.py takes)
    data               WORK/data/train-64: the Shapes training set as an imagefolder
    stage 2  unet      training/train_text2img.py --unet_config training/recipes/shapes/unet_config.json
                       (EMA, min-SNR-γ, v-prediction, caption dropout), resumed from its latest checkpoint;
                       a constant learning rate, then --stage2_decay_steps resumed with it decaying linearly
    defaults           steps / guidance / sampler chosen by measured adherence on held-in prompts
    assemble           latent_diffusion/default_model/: fp16 safetensors (≤ 15 MB), generation_config.json,
                       README.md (model card with recipe, metrics and a sample grid), recipe_metrics.json

Killing the recipe at any moment loses at most one checkpoint interval; the
same command continues. `WORK/compute.json` records the compute seconds of
every stage (summed over resumed runs). `--stop_after STAGE` ends the run
after a stage (for example `base` or `data`); `--stage2_steps` can be raised
later to train the UNet further from its last checkpoint (the new steps
follow the same two phases: constant LR up to stage2_steps − decay steps,
then the decay).

The noise schedule is the cosine one (`squaredcos_cap_v2`, s = 0.008) with
v-prediction and "trailing" timesteps: cosine ᾱ_T is ~0 (near zero terminal
SNR), so sampling starts from pure noise and the solid black/white/gray
backgrounds of Shapes come out at the right brightness, where SD's
scaled-linear schedule leaves a low-frequency trace of the data at t = T;
at SNR ≈ 0 ε-prediction cannot tell x_0 apart, v-prediction can; and
cosine spends more of its steps at the middle SNRs where a 16×16 latent's
layout is decided.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from latent_diffusion.formats.atomic import atomic_folder, write_text_atomic
from latent_diffusion.training.recipes.shapes.common import write_json

HERE = Path(__file__).resolve().parent
TRAINING_DIR = HERE.parent.parent  # training/ (installed as latent_diffusion.training)
REPO = TRAINING_DIR.parent
DEFAULT_MODEL_DIR = REPO / "latent_diffusion" / "default_model"
UNET_CONFIG = HERE / "unet_config.json"
MAX_MODEL_BYTES = 15 * 1024 * 1024
STAGES = ("stage0", "stage1", "base", "data", "stage2", "defaults", "assemble")
GRID_PROMPTS = (
    "a red circle above a blue square",
    "a large yellow triangle on the left on a black background",
    "a small green circle at the top",
    "a purple square to the right of an orange triangle on a white background",
    "a blue triangle below a red square",
    "a large orange square in the center",
    "a small purple circle on the right on a gray background",
    "a green triangle to the left of a yellow circle",
    "a red triangle at the bottom on a white background",
    "a yellow square above a purple circle on a black background",
    "a large blue circle on a gray background",
    "a small red square on the left",
    "an orange triangle to the right of a green circle",
    "a blue square at the top on a black background",
    "a large green circle at the bottom",
    "a yellow triangle below a blue circle on a white background",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="/work/runs/shapes", help="where every stage's run lives (outside the repo)")
    p.add_argument("--output_model_dir", default=str(DEFAULT_MODEL_DIR), help="where the final model is assembled")
    p.add_argument("--stop_after", choices=STAGES, default="assemble")
    p.add_argument("--num_threads", type=int, default=1, help="torch threads of every stage")
    # stage 0 and 1 (their other settings are the scripts' defaults)
    p.add_argument("--stage0_steps", type=int, default=3500)
    p.add_argument("--stage0_batch_size", type=int, default=128)
    p.add_argument("--stage1_steps", type=int, default=3000)
    p.add_argument("--stage1_batch_size", type=int, default=16)
    # data and stage 2
    p.add_argument("--num_train_images", type=int, default=50_000)
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--unet_config", default=str(UNET_CONFIG))
    p.add_argument("--stage2_steps", type=int, default=40_000, help="the shipped model's")
    p.add_argument("--stage2_decay_steps", type=int, default=13_000,
                   help="the last stage-2 steps, resumed from the constant-LR phase with the learning rate "
                        "falling linearly to 0 (lr × (stage2_steps − step) / stage2_steps)")
    p.add_argument("--stage2_batch_size", type=int, default=64)
    p.add_argument("--stage2_learning_rate", type=float, default=5e-4)
    p.add_argument("--stage2_checkpointing_steps", type=int, default=500)
    p.add_argument("--stage2_validation_steps", type=int, default=1000)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument("--caption_dropout", type=float, default=0.1)
    # choosing the generation defaults and the final measurement
    p.add_argument("--selection_prompts", type=int, default=100, help="prompts per candidate setting")
    p.add_argument("--eval_prompts", type=int, default=500, help="prompts of the final adherence measurement")
    p.add_argument("--time_budget_s", type=float, default=1.0, help="seconds allowed for one 64 px image")
    p.add_argument("--history", default=None,
                   help="a markdown file saying how this run departed from one uninterrupted run of the recipe "
                        "(resumed stages, changed settings); the model card quotes it")
    args = p.parse_args(argv)
    if args.stage2_decay_steps < 0:
        p.error(f"--stage2_decay_steps must be >= 0, got {args.stage2_decay_steps}")
    if args.history is not None and not Path(args.history).is_file():  # fail now, not after hours of training
        p.error(f"--history {args.history}: no such file")
    return args


# ---------------------------------------------------------------- bookkeeping


class ComputeLog:
    """WORK/compute.json: seconds of compute per stage, summed over resumed runs."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def set(self, stage: str, seconds: float) -> None:
        self.data[stage] = round(float(seconds), 1)
        write_json(self.path, self.data)

    def add(self, stage: str, seconds: float) -> None:
        self.set(stage, self.data.get(stage, 0.0) + seconds)


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _skip(stage: str, why: str) -> None:
    print(f"[recipe] {stage}: done ({why}), skipped", flush=True)


# ---------------------------------------------------------------- stages 0 and 1


def run_stage0(args, work: Path, compute: ComputeLog) -> dict:
    """Tokenizer and CLIP text encoder in WORK/stage0 (the script resumes by itself)."""
    from latent_diffusion.training.recipes.shapes import stage0_text

    return run_stage_script("stage 0", stage0_text.main, work / "stage0", args.stage0_steps, args.stage0_batch_size,
                            args.num_threads, compute, "stage0_text")


def run_stage1(args, work: Path, compute: ComputeLog) -> dict:
    """AutoencoderKL and its scaling_factor in WORK/stage1 (the script resumes by itself)."""
    from latent_diffusion.training.recipes.shapes import stage1_vae

    return run_stage_script("stage 1", stage1_vae.main, work / "stage1", args.stage1_steps, args.stage1_batch_size,
                            args.num_threads, compute, "stage1_vae")


def run_stage_script(name: str, script_main, out: Path, steps: int, batch_size: int, num_threads: int,
                     compute: ComputeLog, compute_key: str) -> dict:
    """Run a stage script's main() into `out` unless its metrics.json says it is complete; log its compute."""
    metrics = _read_json(out / "metrics.json")
    if metrics is None:
        metrics = script_main(["--output_dir", str(out), "--max_train_steps", str(steps),
                               "--train_batch_size", str(batch_size), "--num_threads", str(num_threads)])
    else:
        _skip(name, f"{out}/metrics.json")
    compute.set(compute_key, metrics["compute_s"])
    return metrics


# ---------------------------------------------------------------- base folder and data


def scheduler_config() -> dict:
    """The noise schedule of the model (see the module docstring for why cosine + v-prediction + trailing).

    Stored as a DDIMScheduler config: the DDPM forward process with no sampler-specific keys (a DDPMScheduler
    config carries variance_type, which the dpm++ sampler refuses).
    """
    return dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0,
    )


def assemble_base(stage0_dir: Path, stage1_dir: Path, unet_config: Path, out: Path) -> Path:
    """A complete diffusers folder: the frozen stage 0/1 parts, the schedule and an untrained UNet of `unet_config`."""
    if (out / "model_index.json").is_file():
        _skip("base", f"{out}/model_index.json")
        return out
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    text_encoder = CLIPTextModel.from_pretrained(str(stage0_dir / "text_encoder"))
    vae = AutoencoderKL.from_pretrained(str(stage1_dir / "vae"))
    config = UNet2DConditionModel.load_config(str(unet_config))
    if config["cross_attention_dim"] != text_encoder.config.hidden_size:
        raise ValueError(f"unet_config {unet_config}: cross_attention_dim {config['cross_attention_dim']} must equal "
                         f"the text encoder's hidden size {text_encoder.config.hidden_size}")
    torch.manual_seed(0)
    pipe = LatentDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(stage0_dir / "tokenizer")),
        scheduler=DDIMScheduler.from_config(scheduler_config()),
    )
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(str(tmp))
    print(f"[recipe] base folder {out}", flush=True)
    return out


def export_data(args, out: Path, compute: ComputeLog) -> Path:
    """The Shapes training split as an imagefolder (skipped when a complete export of the same size exists)."""
    from latent_diffusion.shapes import export_imagefolder

    metadata = out / "metadata.jsonl"
    if metadata.is_file() and sum(1 for _ in metadata.open()) == args.num_train_images:
        _skip("data", f"{metadata}")
        return out
    started = time.perf_counter()
    export_imagefolder(out, args.num_train_images, size=64, seed=args.data_seed, split="train", overwrite=True)
    compute.set("data_export", time.perf_counter() - started)
    return out


# ---------------------------------------------------------------- stage 2


def stage2_phases(args) -> list[tuple[int, str, int]]:
    """(last step, LR schedule, warm-up steps) of each stage-2 phase: a constant LR, then a linear decay to 0."""
    switch = max(args.stage2_steps - args.stage2_decay_steps, 0)
    phases = [(switch, "constant_with_warmup", 500)] if switch > 0 else []
    if args.stage2_steps > switch:
        phases.append((args.stage2_steps, "linear", 0))
    return phases


def stage2_command(args, base: Path, data: Path, out: Path, max_steps: int, lr_scheduler: str,
                   warmup_steps: int) -> list[str]:
    """The train_text2img.py command line of one stage-2 phase (printed by the recipe, so it can be run by hand too)."""
    return [
        sys.executable, str(TRAINING_DIR / "train_text2img.py"),
        "--pretrained_model_name_or_path", str(base),
        "--unet_config", str(args.unet_config),
        "--train_data_dir", str(data),
        "--output_dir", str(out),
        "--resolution", "64",
        "--train_batch_size", str(args.stage2_batch_size),
        "--learning_rate", str(args.stage2_learning_rate),
        "--lr_scheduler", lr_scheduler,
        "--lr_warmup_steps", str(warmup_steps),
        "--max_train_steps", str(max_steps),
        "--checkpointing_steps", str(args.stage2_checkpointing_steps),
        "--checkpoints_total_limit", "3",
        "--resume_from_checkpoint", "latest",
        "--use_ema", "--ema_decay", str(args.ema_decay),
        "--snr_gamma", str(args.snr_gamma),
        "--prediction_type", "v_prediction",
        "--caption_dropout", str(args.caption_dropout),
        "--validation_prompts", *GRID_PROMPTS,
        "--validation_metrics", "shapes_adherence",
        "--validation_steps", str(args.stage2_validation_steps),
        "--num_validation_inference_steps", "20",
        "--validation_guidance_scale", "4.0",
        "--report_to", "none",
        "--seed", "0",
    ]


def stage2_lr_words(args) -> str:
    """The stage-2 learning-rate schedule in words, for the model card."""
    words, start = [], 0
    for end, schedule, _ in stage2_phases(args):
        if schedule == "linear":
            words.append(f"from step {start} lr × ({end} − step) / {end}")
        else:
            words.append("constant after 500 warm-up steps")
        start = end
    return f"lr {args.stage2_learning_rate}, " + ", then ".join(words)


def run_stage2(args, base: Path, data: Path, out: Path, compute: ComputeLog) -> Path:
    """Train the UNet with train_text2img.py through each phase to --stage2_steps (resuming), timed into compute.json."""
    for max_steps, lr_scheduler, warmup_steps in stage2_phases(args):
        done = _read_json(out / "recipe_stage2.json")
        if done and done["max_train_steps"] >= max_steps and (out / "model_index.json").is_file():
            _skip(f"stage 2 ({lr_scheduler} to step {max_steps})", f"{out} reached {done['max_train_steps']} steps")
            continue
        run_timed(stage2_command(args, base, data, out, max_steps, lr_scheduler, warmup_steps), args.num_threads,
                  compute)
        write_json(out / "recipe_stage2.json", {"max_train_steps": max_steps})
    return out


def run_timed(command: list[str], num_threads: int, compute: ComputeLog) -> None:
    """Run one stage-2 command, adding its wall time to compute.json every minute (so a killed run still counts)."""
    print("[recipe] stage 2:", " ".join(command), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(num_threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen(command, env=env, cwd=str(REPO))
    last = time.perf_counter()
    while True:
        try:
            code = process.wait(timeout=60)
            break
        except subprocess.TimeoutExpired:
            now = time.perf_counter()
            compute.add("stage2_unet", now - last)
            last = now
    compute.add("stage2_unet", time.perf_counter() - last)
    if code != 0:
        raise SystemExit(f"[recipe] stage 2 failed with exit code {code}; rerun the recipe to resume it")


# ---------------------------------------------------------------- generation defaults and assembly


def generate(pipe, prompts: Sequence[str], steps: int, guidance: float, sampler: str, seed: int = 0, batch: int = 50):
    """One image per prompt; prompt i always gets the generator seeded with seed + i."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, sampler=sampler,
                       generator=generators).images
    return images


def time_one_image(pipe, steps: int, guidance: float, sampler: str, repeats: int = 3) -> float:
    """Median seconds for one 64 px image at these settings (after one warm-up call)."""
    generate(pipe, ["a red circle above a blue square"], steps, guidance, sampler)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        generate(pipe, ["a red circle above a blue square"], steps, guidance, sampler)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def choose_defaults(args, model_dir: Path, out: Path, compute: ComputeLog) -> dict:
    """Measure adherence of a small grid of settings on held-in prompts; take the best within the time budget.

    Ties (within 0.02 of the best) go to fewer steps, then lower guidance.
    """
    chosen = _read_json(out)
    if chosen is not None:
        _skip("defaults", str(out))
        return chosen
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.shapes import evaluation_prompts, score_images

    started = time.perf_counter()
    pipe = LatentDiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    prompts = [p for p, cats in evaluation_prompts(args.selection_prompts * 5 // 4, seed=1) if "held_out" not in cats]
    candidates = []
    for sampler in ("dpm++", "ddim"):
        for steps in (10, 20):
            for guidance in (2.0, 4.0, 7.5):
                report = score_images(generate(pipe, prompts, steps, guidance, sampler), prompts)
                candidates.append({"sampler": sampler, "num_inference_steps": steps, "guidance_scale": guidance,
                                   "adherence": report["overall"]})
                print(f"[recipe] defaults candidate {candidates[-1]}", flush=True)
    best = max(c["adherence"] for c in candidates)
    near = [c for c in candidates if c["adherence"] >= best - 0.02]
    near.sort(key=lambda c: (c["num_inference_steps"], c["guidance_scale"], c["sampler"] != "dpm++"))
    pick = None
    for c in near + sorted((c for c in candidates if c not in near), key=lambda c: -c["adherence"]):
        c["seconds_one_image"] = time_one_image(pipe, c["num_inference_steps"], c["guidance_scale"], c["sampler"])
        if c["seconds_one_image"] <= args.time_budget_s:
            pick = c
            break
    pick = pick or near[0]  # nothing meets the budget on this machine: the most adherent of the fastest
    chosen = {"num_inference_steps": pick["num_inference_steps"], "guidance_scale": pick["guidance_scale"],
              "sampler": pick["sampler"], "selection": {"prompts": len(prompts), "candidates": candidates,
                                                         "picked": pick}}
    write_json(out, chosen)
    compute.set("choose_defaults", time.perf_counter() - started)
    return chosen


def folder_weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def assemble_model(args, trained: Path, defaults: dict, out: Path, report: dict, compute: ComputeLog) -> Path:
    """The trained pipeline in float16 with its generation defaults, a model card, a sample grid and the metrics."""
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.shapes import format_report

    started = time.perf_counter()
    pipe = LatentDiffusionPipeline.from_pretrained(str(trained))
    pipe.generation_defaults = {k: defaults[k] for k in ("num_inference_steps", "guidance_scale", "sampler")}
    with atomic_folder(out) as tmp:
        pipe.to(torch.float16).save_pretrained(str(tmp))
        size = folder_weight_bytes(tmp)
        if size > MAX_MODEL_BYTES:
            raise SystemExit(f"[recipe] the fp16 model weighs {size / 2**20:.1f} MiB, over the 15 MiB limit")
        evaluation, seconds, prompts = measure_shipped(args, tmp, defaults)
        compute.set("final_evaluation", time.perf_counter() - started)
        metrics = {
            "adherence": {k: evaluation[k] for k in ("overall", "single", "position", "two_objects", "background",
                                                     "held_out")},
            "adherence_counts": evaluation["counts"],
            "eval_prompts": len(prompts),
            "seconds_one_image": seconds,
            "threads": torch.get_num_threads(),
            "weights_bytes": size,
            "generation_defaults": pipe.generation_defaults,
            "compute_s": compute.data,
            **report,
        }
        write_json(tmp / "recipe_metrics.json", metrics)
        write_text_atomic(tmp / "README.md", model_card(args, metrics, format_report(evaluation)))
    print(f"[recipe] assembled {out} ({size / 2**20:.2f} MiB of weights); adherence {evaluation['overall']:.3f}",
          flush=True)
    return out


def measure_shipped(args, folder: Path, defaults: dict) -> tuple[dict, float, list[str]]:
    """What users will get, measured on the fp16 folder loaded the way from_pretrained() loads it: adherence on
    --eval_prompts prompts, seconds for one image, and the sample grid (written into the folder)."""
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.shapes import evaluation_prompts, score_images
    from latent_diffusion.training.validation import image_grid

    shipped = LatentDiffusionPipeline.from_pretrained(str(folder))
    shipped.set_progress_bar_config(disable=True)
    prompts = [p for p, _ in evaluation_prompts(args.eval_prompts, seed=2)]
    steps, guidance, sampler = defaults["num_inference_steps"], defaults["guidance_scale"], defaults["sampler"]
    evaluation = score_images(generate(shipped, prompts, steps, guidance, sampler, seed=10_000), prompts)
    seconds = time_one_image(shipped, steps, guidance, sampler)
    grid = image_grid(generate(shipped, list(GRID_PROMPTS), steps, guidance, sampler), columns=4)
    grid.resize((grid.width * 2, grid.height * 2), resample=0).save(folder / "sample_grid.png")
    return evaluation, seconds, prompts


RECIPE_COMMAND = "python training/recipes/shapes/recipe.py --work_dir WORK"
GRAMMAR_AWARE_NOTE = """Stage 0's supervision knows the Shapes grammar: each hard negative is the caption's parse with one
part changed, and the relation-binding loss takes its targets (the relation word, the first object's colour
and shape, the second object's side) from the parse. The text encoder is taught the structure the Shapes
scorer checks, so read the adherence figures as those of a model trained with that knowledge, not of one
that learned the grammar from (image, caption) pairs alone."""


def made_by_words(args) -> str:
    """How the model card says the model was made: one run of the recipe, or (with --history) resumed rounds."""
    if args.history is None:
        return f"One run of the recipe, from nothing, each stage resumable: `{RECIPE_COMMAND}`."
    return (f"With the Shapes recipe (`{RECIPE_COMMAND}`, each stage resumable), but not in one run of it: "
            "this copy was trained in resumed rounds whose settings changed between them (\"How this copy was "
            "trained\", below). The table states the recipe's settings when this copy was assembled.")


def spatial_words(text_eval: dict) -> str:
    """Stage 0's spatial scores for the card: hard-negative accuracy by position/relation edit, relation binding."""
    by_edit = text_eval.get("hard_negative_accuracy_by_edit", {})
    spatial = ", ".join(f"{k} {by_edit[k]:.2f}" for k in ("position", "relation") if k in by_edit)
    spatial = f" ({spatial})" if spatial else ""
    binding = text_eval.get("relation_binding_accuracy")
    if binding:
        spatial += (f"; relation binding (side of the second object, first object's colour/shape read from the states): "
                    f"{binding['side']:.2f}, {binding['colour']:.2f}/{binding['shape']:.2f}")
    return spatial


def stage_table(args, s0: dict, s1: dict) -> str:
    """The card's table of the three stages: what each trained and what it scored."""
    return f"""| stage | what | result |
|---|---|---|
| 0 text | CLIP-format BPE tokenizer ({s0['vocab_size']} tokens, window {s0['model_max_length']}); CLIP text encoder ({s0['parameters_text'] / 1e6:.2f}M params) trained contrastively with a ViT on (image, caption) pairs, with hard-negative captions, a token-identity and a relation-binding loss; {s0['max_train_steps']} steps of batch {s0['train_batch_size']} | caption→image top-1 among {s0['eval']['candidates']}: {s0['eval']['retrieval_top1_full_captions']:.3f} (full captions), hard-negative accuracy {s0['eval']['hard_negative_accuracy']:.3f}{spatial_words(s0['eval'])} |
| 1 vae | `AutoencoderKL`, factor {s1['downsampling_factor']}, 4 latent channels ({s1['parameters'] / 1e6:.2f}M params), L1 + L2 + 1e-6·KL; {s1['max_train_steps']} steps of batch {s1['train_batch_size']}; scaling_factor {s1['scaling_factor']:.4f} = 1/std of the latents | PSNR {s1['eval']['psnr_db']:.1f} dB, scorer accuracy on reconstructions {s1['eval']['scorer_accuracy_reconstructions']:.3f} |
| 2 unet | `UNet2DConditionModel` from `training/recipes/shapes/unet_config.json`, trained with `training/train_text2img.py` on {args.num_train_images} Shapes images: v-prediction, cosine schedule, min-SNR-γ {args.snr_gamma}, EMA {args.ema_decay}, caption dropout {args.caption_dropout}, batch {args.stage2_batch_size}, {stage2_lr_words(args)} | see below |"""


def model_card(args, metrics: dict, adherence_table: str) -> str:
    """README.md of the embedded model: what it is, how it was made, what it scores."""
    s0, s1 = metrics["stage0"], metrics["stage1"]
    d = metrics["generation_defaults"]
    compute = "\n".join(f"| {k} | {v / 60:.1f} min |" for k, v in metrics["compute_s"].items())
    history = f"\n## How this copy was trained\n\n{Path(args.history).read_text().strip()}\n" if args.history else ""
    made_by = made_by_words(args)
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
license: apache-2.0
tags: [text-to-image, latent-diffusion, stable-diffusion, shapes]
---

# latent_diffusion embedded default: Shapes

A tiny latent text-to-image model (Stable Diffusion format, float16
safetensors, {metrics['weights_bytes'] / 2**20:.1f} MiB of weights) shipped inside the `latent_diffusion`
package and loaded by `LatentDiffusionPipeline.from_pretrained()` with no argument, offline. It draws the
Shapes world of `docs/shapes.md`: one or two coloured circles, squares and triangles on a white, gray or
black background, with sizes, positions and relations.

```python
from latent_diffusion import LatentDiffusionPipeline
pipe = LatentDiffusionPipeline.from_pretrained()
image = pipe("a red circle above a blue square").images[0]
```

Generation defaults (`generation_config.json`, chosen by measured adherence): {d['num_inference_steps']} steps,
guidance {d['guidance_scale']}, sampler `{d['sampler']}`.

![samples](sample_grid.png)

## How it was made

{made_by}

{stage_table(args, s0, s1)}

{GRAMMAR_AWARE_NOTE}

Compute (CPU):

| stage | time |
|---|---|
{compute}
{history}
## Adherence (strict Shapes scorer, {metrics['eval_prompts']} prompts of `evaluation_prompts(seed=2)`)

```
{adherence_table}
```

One 64×64 image at the defaults: {metrics['seconds_one_image']:.2f} s ({metrics['threads']} CPU threads).
Held-out colour-shape pairs (purple triangle, orange circle, green square) never occur in training data;
their row measures compositional generalisation.
"""


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    compute = ComputeLog(work / "compute.json")
    stop = STAGES.index(args.stop_after)

    stage0 = run_stage0(args, work, compute)
    if stop == STAGES.index("stage0"):
        return
    stage1 = run_stage1(args, work, compute)
    if stop == STAGES.index("stage1"):
        return
    base = assemble_base(work / "stage0", work / "stage1", Path(args.unet_config), work / "base")
    if stop == STAGES.index("base"):
        return
    data = export_data(args, work / "data" / "train-64", compute)
    if stop == STAGES.index("data"):
        return
    trained = run_stage2(args, base, data, work / "stage2", compute)
    if stop == STAGES.index("stage2"):
        return
    defaults = choose_defaults(args, trained, work / "generation_defaults.json", compute)
    if stop == STAGES.index("defaults"):
        return
    report = {"stage0": stage0, "stage1": stage1, "stage2_steps": args.stage2_steps}
    assemble_model(args, trained, defaults, Path(args.output_model_dir), report, compute)


if __name__ == "__main__":
    main(sys.argv[1:])
