"""Issue 31, item 1: every sampler works on the embedded default model (cosine betas, σ_max ≈ 2·10⁴).

The Euler family starts its plan no higher than σ = 80 in the pipeline (`robust_settings`); for SD's
schedule (σ_max ≈ 14.6) that changes nothing, so diffusers' numbers hold there (tests/test_samplers.py,
tests/test_pipeline_samplers.py).
"""
import json

import numpy as np
import pytest
import torch

from latent_diffusion.diffusion.samplers import SAMPLER_NAMES, get_sampler, robust_settings
from latent_diffusion.diffusion.samplers.sigmas import EDM_SIGMA_MAX, limit_plan_sigma
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.formats.assets import default_model_path

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
COSINE = dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
PROMPTS = ["a red circle", "a blue triangle above a yellow square", "a green square on a black background",
           "a yellow circle"]
FLOOR = 0.5  # all eight pass it at 20 steps, guidance 4, seed 3; heun was 0/4 before the σ limit (docs/samplers.md)


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun"])
@pytest.mark.parametrize("steps", [1, 5, 20, 1000])
def test_limit_changes_nothing_for_sd(name, steps):
    """SD's σ_max ≈ 14.6 is below the limit: the plan is diffusers' own."""
    schedule = NoiseSchedule.from_config(SD)
    plain = get_sampler(name, schedule).timesteps(steps)
    assert torch.equal(get_sampler(name, schedule, **robust_settings(name)).timesteps(steps), plain)


@pytest.mark.parametrize("steps", [2, 20, 1000])
def test_limit_starts_cosine_plans_at_sigma_80(steps):
    schedule = NoiseSchedule.from_config(COSINE)
    sampler = get_sampler("heun", schedule, **robust_settings("heun"))
    plan = sampler.timesteps(steps)
    sigmas = sampler.plan_sigmas(plan)
    table = sampler.sigma_table()
    top = int(plan[0])
    assert sigmas[0] <= EDM_SIGMA_MAX < table[top + 1]  # the highest training timestep under the limit
    assert bool((plan[1:] < plan[:-1]).all())  # still strictly descending
    assert len(plan) == steps or steps == 1000  # only timesteps above the limit are dropped
    x = sampler.start_from_noise(torch.ones(1, 1, 1, 1), plan)
    assert float(x) == pytest.approx(sigmas[0] / np.sqrt(1 + sigmas[0] ** 2))


def test_limit_below_sigma_0_names_the_setting():
    table = np.array([0.1, 1.0, 10.0])
    with pytest.raises(ValueError, match="sigma_max_limit"):
        limit_plan_sigma(torch.tensor([2.0, 1.0]), table, 0.01)


def test_only_the_euler_family_is_limited():
    assert {name for name in SAMPLER_NAMES if robust_settings(name)} == {"euler", "euler_a", "heun"}


@pytest.fixture(scope="module")
def default_pipe():
    from latent_diffusion.pipelines.text2img import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained("default-20-step")  # the samplers' model; LCM has its own
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_draws_the_prompt_on_the_default(default_pipe, name):
    """Shapes adherence of each sampler on the shipped model, above a floor (heun was 0/4 before the limit)."""
    from latent_diffusion.shapes import score_images

    assert json.loads((default_model_path() / "scheduler" / "scheduler_config.json").read_text())["beta_schedule"] \
        == "squaredcos_cap_v2"
    images = default_pipe(PROMPTS, sampler=name, num_inference_steps=20, guidance_scale=4.0,
                          generator=torch.Generator().manual_seed(3)).images
    scores = score_images(images, PROMPTS)
    assert scores["overall"] >= FLOOR, scores["failures"]
