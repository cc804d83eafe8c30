"""The pipeline with every sampler and σ schedule against diffusers' StableDiffusionPipeline on the same tiny weights."""
import numpy as np
import pytest
from conftest import diffusers_scheduler_of
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
)

from latent_diffusion import LatentDiffusionPipeline

FLAGS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
PROMPTS = ["a red circle above a blue square", "a cat on a sofa"]


def generate(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 8, "guidance_scale": 7.5, "output_type": "np", **kwargs}
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **kwargs).images


def theirs(folder, sampler, sigma_schedule):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    cls, kwargs = diffusers_scheduler_of(sampler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kwargs, **FLAGS[sigma_schedule])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ours(sd_folder):
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dpm_karras_matches_diffusers(ours, sd_folder):
    """Issue 15: pipe(..., sampler="dpm++", sigma_schedule="karras") = DPMSolverMultistepScheduler(use_karras_sigmas=True)."""
    a = generate(ours, sampler="dpm++", sigma_schedule="karras")
    b = generate(theirs(sd_folder, "dpm++", "karras"))
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() <= 1 / 255
    assert np.abs(a - generate(ours, sampler="dpm++")).max() > 1 / 255  # Karras σ are a different plan


@pytest.mark.parametrize("sampler,sigma_schedule", [
    ("euler", "default"), ("euler", "karras"), ("euler_a", "default"), ("heun", "default"), ("heun", "exponential"),
    ("dpm++_sde", "default"), ("dpm++_sde", "karras"), ("unipc", "default"), ("unipc", "karras"),
])
def test_sampler_matches_diffusers_pipeline(ours, sd_folder, sampler, sigma_schedule):
    """Same weights and seed: init_noise_sigma, scale_model_input and the ancestral/SDE noise all as diffusers'."""
    a = generate(ours, sampler=sampler, sigma_schedule=sigma_schedule)
    b = generate(theirs(sd_folder, sampler, sigma_schedule))
    assert np.abs(a - b).max() <= 1 / 255


def test_config_karras_flag_is_the_default_schedule(sd_folder, tmp_path):
    """A folder whose scheduler config sets use_karras_sigmas samples with Karras σ unless told otherwise."""
    import json
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "karras")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_karras_sigmas": True}))
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    plain = LatentDiffusionPipeline.from_pretrained(sd_folder)
    plain.set_progress_bar_config(disable=True)
    karras = generate(plain, sampler="euler", sigma_schedule="karras")
    assert np.abs(generate(pipe, sampler="euler") - karras).max() == 0
    assert np.abs(generate(pipe, sampler="euler", sigma_schedule="default") - generate(plain, sampler="euler")).max() == 0


@pytest.mark.parametrize("kwargs,argument", [
    (dict(sampler="ddim", sigma_schedule="karras"), "sigma_schedule='karras' is not offered by the 'ddim' sampler"),
    (dict(sampler="euler_a", sigma_schedule="exponential"), "sigma_schedule='exponential' is not offered"),
    (dict(sampler="euler", sigma_schedule="beta"), "sigma_schedule must be one of"),
])
def test_bad_sigma_schedule_names_the_argument(ours, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        generate(ours, **kwargs)


def test_ddim_unchanged_by_the_default_sigma_schedule(ours, sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert np.abs(generate(ours, sampler="ddim", sigma_schedule="default") - generate(pipe)).max() <= 1 / 255
