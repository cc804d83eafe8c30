"""training/distill_lcm.py on tiny components: an LCM-LoRA diffusers loads with our image, exact resume, a full LCM UNet,
the loss's pieces, flag errors, and two processes."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_data import make_imagefolder
from test_lcm_tcd import generate, load_ours, load_theirs
from conftest import run_script_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "distill_lcm.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    captions = ["a red circle above a blue square", "a cat on a sofa"]
    return str(make_imagefolder(tmp_path_factory.mktemp("data") / "images", 4, captions=captions))


def flags(sd_folder, data_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", data_dir,
            "--output_dir", str(output_dir), "--resolution", "32", "--train_batch_size", "2",
            "--learning_rate", "1e-2", "--report_to", "none", "--seed", "3", *[str(f) for f in extra]]


def distill(sd_folder, data_dir, output_dir, *extra):
    """The distillation script's main() in this process (a fresh accelerate state each time)."""
    from latent_diffusion.training.distill_lcm import main

    run_script_main(main, flags(sd_folder, data_dir, output_dir, *extra))


@pytest.mark.slow
def test_lcm_lora_loads_in_diffusers_with_our_image(sd_folder, data_dir, tmp_path):
    """2 steps → OUT/pytorch_lora_weights.safetensors: StableDiffusionPipeline + load_lora_weights + LCMScheduler
    gives our pipeline's image (sampler "lcm"), and validation grids at 1, 2, 4 and 8 steps."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    distill(sd_folder, data_dir, out, "--max_train_steps", 2, "--lora_rank", 4, "--validation_prompts", "a cat",
            "--validation_steps", 2, "--checkpointing_steps", 2)
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") and ".lora." in k for k in lora)
    for k in (1, 2, 4, 8):
        assert (out / f"lcm-{k}-steps" / "validation" / "step-000002.png").is_file()
    assert "Latent consistency distillation" in (out / "README.md").read_text()
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()  # the target network is checkpointed
    ours, theirs = load_ours(sd_folder), load_theirs(StableDiffusionPipeline, sd_folder, "lcm")
    base = generate(ours, sampler="lcm", guidance_scale=1.0)
    ours.load_lora_weights(str(out))
    theirs.load_lora_weights(str(out))
    a, b = generate(ours, sampler="lcm", guidance_scale=1.0), generate(theirs, guidance_scale=1.0)
    assert np.abs(a - base).max() > 1 / 255  # distillation moved the adapter
    assert np.abs(a - b).max() <= 1 / 255


@pytest.mark.slow
def test_resume_is_exact(sd_folder, data_dir, tmp_path):
    """4 steps straight == 2, stop, 2 more: adapter, EMA target and optimizer come back from the checkpoint."""
    extra = ["--lora_rank", 4, "--checkpointing_steps", 2]
    distill(sd_folder, data_dir, tmp_path / "straight", "--max_train_steps", 4, *extra)
    distill(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 2, *extra)
    distill(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 4, "--resume_from_checkpoint", "latest", *extra)
    assert_same_files(tmp_path / "straight" / "checkpoint-4", tmp_path / "split" / "checkpoint-4",
                      ("lora_model_0.safetensors", "ema.safetensors"))


def assert_same_files(a, b, names):
    """Each safetensors file `name` holds the same non-empty tensors in checkpoint folders a and b."""
    for name in names:
        straight, split = load_file(str(a / name)), load_file(str(b / name))
        assert straight.keys() == split.keys() and straight
        for key in straight:
            torch.testing.assert_close(split[key], straight[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_full_unet_folder_samples_as_an_lcm(sd_folder, data_dir, tmp_path):
    out = tmp_path / "full"
    distill(sd_folder, data_dir, out, "--max_train_steps", 1, "--full_unet", "--loss_type", "l2",
            "--num_ddim_timesteps", 20, "--timestep_scaling", 5)
    assert json.loads((out / "generation_config.json").read_text())["sampler"] == "lcm"
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    assert (scheduler["original_inference_steps"], scheduler["timestep_scaling"]) == (20, 5.0)  # the grid trained on
    pipe = load_ours(out)
    assert pipe.generation_defaults["sampler"] == "lcm" and pipe.generation_defaults["num_inference_steps"] == 4
    assert generate(pipe, num_inference_steps=None, guidance_scale=None).shape == (2, 32, 32, 3)


@pytest.mark.slow
def test_phased_full_unet_folder_samples_with_ddim_in_diffusers(sd_folder, data_dir, tmp_path):
    """--num_phases 2 --full_unet: a diffusers folder whose DDIMScheduler (trailing) and defaults (ddim, 2 steps,
    guidance 1) sample the phases; diffusers' own pipeline as it loads the folder gives our image."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "pcm"
    distill(sd_folder, data_dir, out, "--max_train_steps", 2, "--full_unet", "--num_phases", 2,
            "--validation_prompts", "a cat", "--validation_steps", 2)
    defaults = {"sampler": "ddim", "num_inference_steps": 2, "guidance_scale": 1.0}
    assert json.loads((out / "generation_config.json").read_text()) == defaults
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["timestep_spacing"], scheduler["clip_sample"]) == (
        "DDIMScheduler", "trailing", False)
    assert (out / "ddim-2-steps" / "validation" / "step-000002.png").is_file()
    assert "| num_phases | 2 |" in (out / "README.md").read_text()
    ours = load_ours(out)
    theirs = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    a = generate(ours, num_inference_steps=None, guidance_scale=None)
    b = generate(theirs, num_inference_steps=2, guidance_scale=1.0)
    assert np.abs(a - generate(load_ours(sd_folder), sampler="ddim", num_inference_steps=2, guidance_scale=1.0)).max() > 0
    assert np.abs(a - b).max() <= 1 / 255


@pytest.mark.slow
def test_average_decay_saves_the_slow_average_and_resumes_exactly(sd_folder, data_dir, tmp_path):
    """--average_decay: both averages are checkpointed (ema.safetensors, ema-average.safetensors), 2 + 1 steps equal
    3, and the saved UNet is the slow average, not the target θ⁻."""
    from diffusers import UNet2DConditionModel

    extra = ["--full_unet", "--ema_decay", "0.05", "--average_decay", "0.1", "--checkpointing_steps", 1]  # under the warm-up caps
    distill(sd_folder, data_dir, tmp_path / "straight", "--max_train_steps", 3, *extra)
    distill(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 2, *extra)
    distill(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 3, "--resume_from_checkpoint", "latest", *extra)
    assert_same_files(tmp_path / "straight" / "checkpoint-3", tmp_path / "split" / "checkpoint-3",
                      ("ema.safetensors", "ema-average.safetensors"))
    average = load_file(str(tmp_path / "straight" / "checkpoint-3" / "ema-average.safetensors"))
    target = load_file(str(tmp_path / "straight" / "checkpoint-3" / "ema.safetensors"))
    saved = dict(UNet2DConditionModel.from_pretrained(tmp_path / "straight", subfolder="unet").named_parameters())
    assert max((average[k] - target[k]).abs().max() for k in average) > 1e-4  # the two differ, so the check means something
    for key in average:
        torch.testing.assert_close(saved[key].detach().float(), average[key], atol=1e-6, rtol=0)
    assert "| average_decay | 0.1 |" in (tmp_path / "straight" / "README.md").read_text()


def test_consistency_parametrisation_and_teacher_step():
    """f(x, 0) ≈ x (c_skip(0) = 1); the teacher's guided DDIM step with w = 0 is the conditional DDIM step."""
    from argparse import Namespace

    from latent_diffusion.diffusion.schedules import NoiseSchedule
    from latent_diffusion.text.conditioners import Conditioning
    from latent_diffusion.training.distill_lcm import ConsistencyDistillationLoss

    schedule = NoiseSchedule.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    args = Namespace(num_ddim_timesteps=50, w_min=0.0, w_max=0.0, loss_type="huber", huber_c=0.001,
                     timestep_scaling=10.0)
    eps_of = lambda z, t, cond: 0.1 * z + cond.context.mean()  # noqa: E731  a stand-in ε-network
    loss = ConsistencyDistillationLoss(schedule, eps_of, None, None, {"text_embeds": torch.zeros(1, 3, 4)}, 32, args)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t0 = torch.zeros(2, dtype=torch.long)
    assert (loss.consistency(eps_of(x, t0, Conditioning(torch.ones(2, 3, 4))), x, t0) - x).abs().max() < 1e-3
    t, s = torch.tensor([999, 519]), torch.tensor([979, 499])
    cond = Conditioning(torch.ones(2, 3, 4, dtype=torch.float64))
    z_s = loss.teacher_ddim_step(x, t, s, torch.zeros(2, dtype=torch.float64), cond)
    ab_t, ab_s = schedule.alphas_cumprod[t].view(-1, 1, 1, 1), schedule.alphas_cumprod[s].view(-1, 1, 1, 1)
    eps = eps_of(x, t, cond)
    expected = ab_s.sqrt() * (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt() + (1 - ab_s).sqrt() * eps
    assert (z_s - expected).abs().max() < 1e-6  # the network output is taken in float32
    assert loss.distance(torch.zeros(3), torch.zeros(3)) == 0 and loss.distance(torch.zeros(1), torch.ones(1)) > 0.99


@pytest.mark.parametrize("num_phases", [1, 4, 6])
def test_phases_jump_where_the_ddim_sampler_steps(num_phases):
    """--num_phases M: the consistency function at each timestep of DDIM's M-step plan is that DDIM step (the shipped
    embedded default's schedule: cosine, v-prediction, trailing, ᾱ_0 at the end), the training timesteps lie inside
    their phase and the teacher's step stops at the edge."""
    from argparse import Namespace

    from latent_diffusion.diffusion.samplers import get_sampler
    from latent_diffusion.diffusion.schedules import NoiseSchedule
    from latent_diffusion.formats import assets
    from latent_diffusion.training.distill_lcm import ConsistencyDistillationLoss, phases_of, student_scheduler
    from diffusers import DDIMScheduler

    args = Namespace(num_ddim_timesteps=25, num_phases=num_phases, w_min=7.0, w_max=7.0, loss_type="huber",
                     huber_c=0.001, timestep_scaling=10.0)
    scheduler = student_scheduler(DDIMScheduler.from_pretrained(assets.DEFAULT_MODEL_DIR, subfolder="scheduler"), args)
    assert (scheduler.config.timestep_spacing, scheduler.config.clip_sample) == ("trailing", False)
    schedule = NoiseSchedule.from_config(scheduler.config)
    phases = phases_of(scheduler, args)
    loss = ConsistencyDistillationLoss(schedule, None, None, None, {}, 64, args, phases)
    ddim = get_sampler("ddim", schedule)
    plan = ddim.timesteps(num_phases)
    c = ddim.coefficients(plan)
    gen = torch.Generator().manual_seed(0)
    x, out = (torch.randn(num_phases, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    eps, x0 = ddim_predictions(out, x, schedule, plan)
    expected = torch.stack([c.coef_x0[i] * x0[i] + c.coef_eps[i] * eps[i] for i in range(num_phases)])
    assert (loss.consistency(out, x, plan) - expected).abs().max() < 1e-6
    t, s = loss.draw_timesteps(4096, gen)
    edges = phases.edge_of(t)
    assert set(t.tolist()) == set(phases.grid.tolist()) and set(plan.tolist()) <= set(t.tolist())
    assert bool((edges < s).logical_or(s == edges).all()) and bool((s < t).all()) and bool((t - s <= 40).all())
    assert bool(phases.at_edge(s).any()) and bool((phases.at_edge(s) == (s == edges)).all())


def ddim_predictions(out, x, schedule, timesteps):
    from latent_diffusion.diffusion.gaussian import predictions_from_output

    alpha_bar = schedule.alphas_cumprod[timesteps].view(-1, 1, 1, 1).to(x)
    return predictions_from_output(out, x, alpha_bar, schedule.prediction_type)


@pytest.mark.parametrize("extra, message", [
    (["--full_unet", "--lora_rank", "4"], "--full_unet trains the whole UNet"),
    (["--w_min", "9", "--w_max", "3"], "--w_min 9.0 must be <= --w_max 3.0"),
    (["--num_ddim_timesteps", "0"], "--num_ddim_timesteps must be in"),
    (["--loss_type", "l1"], "--loss_type"),
    (["--masked_loss"], "--masked_loss is not part of consistency distillation"),
    (["--average_decay", "1"], "--average_decay must be in (0, 1)"),
    (["--num_phases", "0"], "--num_phases must be in [1, 50]"),
])
def test_bad_flags_name_the_flag(sd_folder, data_dir, tmp_path, capsys, extra, message):
    from latent_diffusion.training.distill_lcm import parse_distill_args

    with pytest.raises(SystemExit):
        parse_distill_args(flags(sd_folder, data_dir, tmp_path, *extra))
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes(sd_folder, data_dir, tmp_path):
    """accelerate launch --multi_gpu, two CPU processes over gloo: world size 2, distinct ranks, the same weights."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(SCRIPT), *flags(sd_folder, data_dir, tmp_path / "out", "--train_batch_size", 1,
                                             "--max_train_steps", 2, "--lora_rank", 4, "--checkpointing_steps", 2,
                                             "--sample_index_log", tmp_path / "rows")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [(tmp_path / f"rows.rank{r}").read_text().splitlines() for r in range(2)]  # one log per rank: 2 ranks
    steps = [[line.split() for line in log if not line.startswith("weights")] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 2
    for a, b in zip(*steps):
        assert a[0] == b[0] and not set(a[1:]) & set(b[1:])  # same step, disjoint rows: distinct ranks
    assert logs[0][-1].startswith("weights") and logs[0][-1] == logs[1][-1]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
