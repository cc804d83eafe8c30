"""The few-step samplers `lcm` and `tcd` against diffusers' LCMScheduler and TCDScheduler, and the pipeline with them.

Samplers: full loops number for number (float64 schedule swapped into diffusers, as tests/test_samplers.py
does), every prediction type, γ (eta) values, plans of 1–8 steps and other `original_inference_steps`.
Pipeline: within 1/255 of StableDiffusionPipeline / StableDiffusionImg2ImgPipeline with that scheduler, and of
LatentConsistencyModelPipeline on a tiny UNet with a guidance embedding (`time_cond_proj_dim`).
"""
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler
from test_samplers import SD, TOL, fake_model_for, run_ours, x_T

from latent_diffusion.diffusion.samplers import ETA_SAMPLERS, get_sampler
from latent_diffusion.diffusion.samplers.lcm import boundary_scalings, consistency_timesteps
from latent_diffusion.diffusion.schedules import NoiseSchedule

THEIRS = {"lcm": LCMScheduler, "tcd": TCDScheduler}


def run_theirs(name, config, steps, x, seed=0, eta=None, begin=None, z0=None):
    """diffusers' loop (float64 schedule); with `begin` = k, img2img's: timesteps[k:], set_begin_index, add_noise."""
    schedule = NoiseSchedule.from_config(config)
    scheduler = THEIRS[name].from_config(config)
    scheduler.betas = schedule.betas.clone()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = schedule.alphas_cumprod.clone()
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if begin is not None:
        timesteps = timesteps[begin:]
        scheduler.set_begin_index(begin)
        x = scheduler.add_noise(z0, x, timesteps[:1])
    generator, model, kwargs = torch.Generator().manual_seed(seed), fake_model_for(schedule), {}
    if eta is not None:
        kwargs["eta"] = eta
    x = x.clone()
    for t in timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator, **kwargs).prev_sample
    return scheduler.timesteps, x


CONFIGS = {
    "sd": SD,
    "v": {**SD, "prediction_type": "v_prediction"},
    "x0": {**SD, "prediction_type": "sample"},
    "linear_orig20": dict(beta_schedule="linear", original_inference_steps=20),
    "clip": {**SD, "clip_sample": True, "clip_sample_range": 1.5},
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_full_loop_matches_diffusers(config, steps):
    config = CONFIGS[config]
    ts_theirs, theirs = run_theirs("lcm", config, steps, x_T())
    ts_ours, ours = run_ours("lcm", config, steps, x_T(), seed=0)
    assert torch.equal(ts_ours, ts_theirs)
    assert torch.isfinite(theirs).all()
    assert (ours - theirs).abs().max().item() < TOL


@pytest.mark.parametrize("config", ["sd", "v", "x0", "linear_orig20"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_tcd_full_loop_matches_diffusers(config, eta, steps):
    config = CONFIGS[config]
    ts_theirs, theirs = run_theirs("tcd", config, steps, x_T(), eta=eta)
    ts_ours, ours = run_ours("tcd", config, steps, x_T(), seed=0, eta=eta)
    assert torch.equal(ts_ours, ts_theirs)
    assert (ours - theirs).abs().max().item() < TOL


def test_tcd_default_gamma_is_diffusers_step_default():
    _, theirs = run_theirs("tcd", SD, 4, x_T())  # step() without eta: diffusers' 0.3
    _, ours = run_ours("tcd", SD, 4, x_T(), seed=0)
    assert (ours - theirs).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["lcm", "tcd"])
@pytest.mark.parametrize("steps,begin", [(4, 1), (8, 3), (6, 5)])
def test_tail_matches_diffusers_img2img_loop(name, steps, begin):
    z0 = x_T(seed=11) * 0.5 + 0.3
    _, theirs = run_theirs(name, SD, steps, x_T(), begin=begin, z0=z0)
    sampler = get_sampler(name, NoiseSchedule.from_config(SD))
    tail = sampler.timesteps(steps)[begin:]
    from latent_diffusion.diffusion.samplers import Denoiser

    ours = sampler(Denoiser(fake_model_for(sampler.schedule), sampler.schedule), sampler.add_noise(z0, x_T(), tail),
                   tail, generator=torch.Generator().manual_seed(0))
    assert (ours - theirs).abs().max().item() < TOL


def test_noise_matters_and_gamma_zero_is_deterministic():
    a = run_ours("tcd", SD, 4, x_T(), seed=0, eta=0.0)[1]
    assert torch.equal(a, run_ours("tcd", SD, 4, x_T(), seed=5, eta=0.0)[1])
    b = run_ours("tcd", SD, 4, x_T(), seed=0, eta=0.5)[1]
    assert (b - run_ours("tcd", SD, 4, x_T(), seed=5, eta=0.5)[1]).abs().max() > 1e-3
    c = run_ours("lcm", SD, 4, x_T(), seed=0)[1]
    assert (c - run_ours("lcm", SD, 4, x_T(), seed=5)[1]).abs().max() > 1e-3


def test_plan_and_boundary_scalings():
    """The plan is the skipping-step grid t_j = 20j − 1 (N = 50 of T = 1000); c_skip(0) = 1, c_out(0) = 0."""
    assert consistency_timesteps(1000, 50, 4).tolist() == [999, 759, 499, 259]
    assert consistency_timesteps(1000, 50, 1).tolist() == [999]
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]), 10.0)
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 1e-6 and abs(c_out[1] - 1) < 1e-6


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_more_steps_than_the_distillation_grid_is_a_clear_error(name):
    sampler = get_sampler(name, NoiseSchedule.from_config(SD))
    with pytest.raises(ValueError, match="num_inference_steps must be at most original_inference_steps=50"):
        sampler.timesteps(51)


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_tcd_gamma_outside_unit_interval_names_it(eta):
    with pytest.raises(ValueError, match="eta"):
        get_sampler("tcd", NoiseSchedule.from_config(SD), eta=eta)


def test_lcm_refuses_thresholding():
    with pytest.raises(ValueError, match="thresholding"):
        get_sampler("lcm", NoiseSchedule.from_config({**SD, "thresholding": True}))


def test_eta_samplers():
    assert ETA_SAMPLERS == ("ddim", "tcd")


# ----- the pipeline against diffusers' pipelines ----------------------------------------------------------------

PROMPTS = ["a red circle above a blue square", "a cat on a sofa"]


def generate(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "guidance_scale": 1.5, "output_type": "np", **kwargs}
    return pipe(kwargs.pop("prompt", PROMPTS), generator=torch.Generator().manual_seed(seed), **kwargs).images


def load_ours(folder):
    from latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_theirs(cls, folder, name, **components):
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, **components)
    pipe.scheduler = THEIRS[name].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(sd_folder):
    return load_ours(sd_folder)


@pytest.mark.parametrize("name,kwargs", [
    ("lcm", dict(guidance_scale=1.0)), ("lcm", dict(guidance_scale=2.0, num_inference_steps=2)),
    ("tcd", dict(eta=0.3)), ("tcd", dict(eta=0.0, num_inference_steps=8)),
])
def test_pipeline_matches_stable_diffusion_pipeline(ours, sd_folder, name, kwargs):
    from diffusers import StableDiffusionPipeline

    a = generate(ours, sampler=name, **kwargs)
    b = generate(load_theirs(StableDiffusionPipeline, sd_folder, name), **kwargs)
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() <= 1 / 255


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_img2img_matches_diffusers(ours, sd_folder, name):
    from diffusers import StableDiffusionImg2ImgPipeline

    image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    kwargs = dict(image=image, strength=0.6, num_inference_steps=8, prompt=PROMPTS[0])
    a = generate(ours, sampler=name, **kwargs)
    b = generate(load_theirs(StableDiffusionImg2ImgPipeline, sd_folder, name), **kwargs)
    assert np.abs(a - b).max() <= 1 / 255


@pytest.fixture(scope="module")
def lcm_folder(sd_folder, tmp_path_factory):
    """The tiny SD folder with an LCM UNet: guidance embedded through `time_cond_proj_dim` (random weights)."""
    import shutil

    from diffusers import UNet2DConditionModel

    from latent_diffusion.tiny import tiny_unet_config

    folder = shutil.copytree(sd_folder, tmp_path_factory.mktemp("tiny-lcm") / "model")
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**tiny_unet_config(), time_cond_proj_dim=8)
    with torch.no_grad():  # a clearly non-zero guidance projection, so w visibly changes the image
        unet.time_embedding.cond_proj.weight.normal_(0, 1.0)
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize("scale", [1.0, 8.5])
def test_guidance_embedding_matches_latent_consistency_pipeline(lcm_folder, scale):
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    ours = load_ours(lcm_folder)
    calls = []
    ours.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    a = generate(ours, sampler="lcm", guidance_scale=scale)
    assert calls and set(calls) == {2}  # one UNet call per step on the batch of 2: w is embedded, no CFG
    b = generate(load_theirs(LatentConsistencyModelPipeline, lcm_folder, "lcm"), guidance_scale=scale)
    c = generate(load_theirs(StableDiffusionPipeline, lcm_folder, "lcm"), guidance_scale=scale)
    assert np.abs(a - b).max() <= 1 / 255 and np.abs(a - c).max() <= 1 / 255


def test_guidance_embedding_changes_the_image(lcm_folder):
    ours = load_ours(lcm_folder)
    ours.trace_unet = True  # and through the traced UNet, whose inputs then include the embedding
    a, b = generate(ours, sampler="lcm", guidance_scale=1.0), generate(ours, sampler="lcm", guidance_scale=8.5)
    assert np.abs(a - b).max() > 5 / 255
    assert ours.traced_unet().num_traces >= 1


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_lcm_lora_loads_like_any_lora(sd_folder, tmp_path, name):
    """An LCM-LoRA (a LoRA on the UNet, diffusers' layout) with these samplers at guidance 1–2 gives diffusers' image."""
    from diffusers import StableDiffusionPipeline
    from test_lora_loading import make_lora

    lora = make_lora(sd_folder, tmp_path)
    ours, theirs = load_ours(sd_folder), load_theirs(StableDiffusionPipeline, sd_folder, name)
    base = generate(ours, sampler=name)
    ours.load_lora_weights(lora)
    theirs.load_lora_weights(str(tmp_path))
    a, b = generate(ours, sampler=name), generate(theirs)
    assert np.abs(a - base).max() > 5 / 255
    assert np.abs(a - b).max() <= 1 / 255


def test_cli_tcd_with_gamma_matches_the_pipeline(ours, sd_folder, tmp_path):
    """`--sampler tcd --eta 0.3` in the CLI is the pipeline's sampler="tcd", eta=0.3; a γ over 1 is refused by name."""
    from PIL import Image

    from latent_diffusion.apps.cli import main

    args = ["generate", PROMPTS[0], "--model", str(sd_folder), "--steps", "4", "--guidance", "1.5", "--quiet",
            "--sampler", "tcd", "--eta", "0.3", "--seed", "3"]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    direct = ours(PROMPTS[0], sampler="tcd", eta=0.3, num_inference_steps=4, guidance_scale=1.5,
                  generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(direct))
    with pytest.raises(ValueError, match="eta"):
        ours(PROMPTS[0], sampler="tcd", eta=1.5, num_inference_steps=2)
