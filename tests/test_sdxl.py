"""SDXL folders in LatentDiffusionPipeline: number-for-number against diffusers' StableDiffusionXLPipeline, saving, errors.

All on the tiny SDXL components of `latent_diffusion.tiny.tiny_sdxl_components` (two CLIP text encoders,
the second with a projection; a UNet with `addition_embed_type="text_time"`).
"""
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
)

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.vae import upcast_half_vae
from latent_diffusion.diffusion.samplers import SAMPLER_NAMES

DIFFUSERS_SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
PROMPTS = ["a red circle above a blue square", "a cat on a sofa"]
needs_euler = pytest.mark.skipif("euler" not in SAMPLER_NAMES, reason="the euler sampler is not in this build yet")


def load_ours(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_theirs(folder, sampler):
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = DIFFUSERS_SCHEDULERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "guidance_scale": 5.0, "output_type": "np", **kwargs}
    return pipe(kwargs.pop("prompt", PROMPTS[0]), generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_sdxl_folder_is_recognised(sdxl_folder):
    pipe = load_ours(sdxl_folder)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2 is not None and pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.generation_defaults["guidance_scale"] == 5.0  # diffusers' SDXL default; no generation_config.json
    cond = pipe.encode_prompt(PROMPTS, ["", ""], size=(32, 32))
    assert cond.context.shape == (4, 77, 64)  # [uncond; cond], penultimate states of both encoders (32 + 32)
    assert cond.text_embeds.shape == (4, 16) and cond.time_ids.shape == (4, 6)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", pytest.param("euler", marks=needs_euler)])
def test_matches_diffusers_sdxl(sdxl_folder, sampler):
    ours, theirs = load_ours(sdxl_folder), load_theirs(sdxl_folder, sampler)
    kwargs = dict(prompt=PROMPTS, prompt_2=["a small green square", "a cat"], negative_prompt=["", "blurry"],
                  negative_prompt_2="ugly", num_images_per_prompt=2)
    a = generate(ours, sampler=sampler, **kwargs)
    b = generate(theirs, **kwargs)
    assert a.shape == b.shape == (4, 32, 32, 3)
    assert np.abs(a - b).max() <= 1 / 255


@pytest.mark.parametrize("sampler", ["ddim", pytest.param("euler", marks=needs_euler)])
def test_size_conditioning_and_zero_negatives_match_diffusers(sdxl_folder, sampler):
    """No negative prompt: force_zeros_for_empty_prompt guides against zeros; the size ids change the image."""
    ours, theirs = load_ours(sdxl_folder), load_theirs(sdxl_folder, sampler)
    sizes = dict(original_size=(64, 48), crops_coords_top_left=(8, 4), target_size=(32, 32))
    zeros = generate(ours, sampler=sampler, **sizes)
    assert np.abs(zeros - generate(theirs, **sizes)).max() <= 1 / 255
    assert np.abs(zeros - generate(ours, sampler=sampler)).max() > 1e-3  # the ids reach the UNet
    encoded_empty = generate(ours, sampler=sampler, negative_prompt="", **sizes)
    assert np.abs(zeros - encoded_empty).max() > 1e-3  # zeros, not the encoded "", as the unconditional branch


def test_force_zeros_off_encodes_the_empty_prompt(sdxl_folder):
    ours, theirs = load_ours(sdxl_folder), load_theirs(sdxl_folder, "ddim")
    ours.register_to_config(force_zeros_for_empty_prompt=False)
    theirs.register_to_config(force_zeros_for_empty_prompt=False)
    a, b = generate(ours, sampler="ddim"), generate(theirs)
    assert np.abs(a - b).max() <= 1 / 255
    assert np.abs(a - generate(ours, sampler="ddim", negative_prompt="")).max() == 0


def test_traced_sdxl_unet_gives_the_eager_image(sdxl_folder):
    pipe = load_ours(sdxl_folder)
    pipe.trace_unet = False
    eager = generate(pipe, sampler="dpm++")
    pipe.trace_unet = True
    assert np.array_equal(eager, generate(pipe, sampler="dpm++"))
    assert pipe.traced_unet().num_traces == 1


def test_saved_sdxl_folder_loads_in_diffusers(sdxl_folder, tmp_path):
    ours = load_ours(sdxl_folder)
    ours.register_to_config(force_zeros_for_empty_prompt=False)
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is False
    assert "safety_checker" not in index and "requires_safety_checker" not in index
    for loader in (StableDiffusionXLPipeline, DiffusionPipeline):
        theirs = loader.from_pretrained(tmp_path)
        assert isinstance(theirs, StableDiffusionXLPipeline)
    assert theirs.config.force_zeros_for_empty_prompt is False
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    assert np.abs(generate(ours, sampler="ddim") - generate(theirs)).max() <= 1 / 255
    again = load_ours(tmp_path)
    assert again.config.force_zeros_for_empty_prompt is False
    assert again.generation_defaults == ours.generation_defaults


def test_saved_sd_folder_has_no_sdxl_entries(sd_folder, tmp_path):
    load_ours(sd_folder).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert not {"text_encoder_2", "tokenizer_2", "force_zeros_for_empty_prompt"} & set(index)


def test_long_sdxl_prompt_is_encoded_in_chunks(sdxl_folder):
    pipe = load_ours(sdxl_folder)
    long_prompt = " ".join(["a red circle above a blue square on a gray background"] * 12)
    cond = pipe.encode_prompt([long_prompt], [""], size=(32, 32))
    assert cond.context.shape == (2, 2 * 77, 64) and cond.text_embeds.shape == (2, 16)
    assert np.isfinite(generate(pipe, prompt=long_prompt, num_inference_steps=2)).all()


def test_sdxl_arguments_on_an_sd_model_are_named(sd_folder):
    pipe = load_ours(sd_folder)
    with pytest.raises(ValueError, match="prompt_2"):
        generate(pipe, prompt_2="a cat", num_inference_steps=1)
    with pytest.raises(ValueError, match="original_size"):
        generate(pipe, original_size=(64, 64), num_inference_steps=1)


def test_bad_second_prompt_is_named(sdxl_folder):
    pipe = load_ours(sdxl_folder)
    with pytest.raises(ValueError, match="negative_prompt_2"):
        generate(pipe, prompt=PROMPTS, negative_prompt_2=["a", "b", "c"], num_inference_steps=1)


def test_sdxl_unet_without_second_encoder_is_a_clear_error(sdxl_folder):
    pipe = load_ours(sdxl_folder)
    parts = {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")}
    with pytest.raises(ValueError, match="text_encoder_2"):
        generate(LatentDiffusionPipeline(**parts), num_inference_steps=1)


def test_folder_missing_text_encoder_2_is_named(sdxl_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sdxl_folder, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ValueError, match="tokenizer_2"):
        LatentDiffusionPipeline.from_pretrained(broken)


def test_half_vae_with_force_upcast_decodes_in_float32():
    from latent_diffusion.tiny import tiny_components

    vae = tiny_components()["vae"].half()
    assert vae.config.force_upcast
    with upcast_half_vae(vae):
        assert vae.dtype == torch.float32
    assert vae.dtype == torch.float16
    with upcast_half_vae(vae, enabled=False):
        assert vae.dtype == torch.float16


def test_cli_generates_from_an_sdxl_folder(sdxl_folder, tmp_path):
    from PIL import Image

    from latent_diffusion.apps.cli import main

    out = tmp_path / "out.png"
    assert main(["generate", "a cat on a sofa", "--model", str(sdxl_folder), "-o", str(out), "--steps", "2",
                 "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (32, 32) and image.text["guidance"] == "5.0"  # the SDXL default guidance


def test_clip_skip_matches_diffusers_sdxl(sdxl_folder):
    """No negative prompt: the unconditional branch is zeros, so clip_skip moves the prompt's layers only, as in
    diffusers; the first encoder has 2 layers and SDXL already uses the penultimate one, so 1 is the most."""
    ours, theirs = load_ours(sdxl_folder), load_theirs(sdxl_folder, "ddim")
    a = generate(ours, sampler="ddim", prompt=PROMPTS, clip_skip=1)
    b = generate(theirs, prompt=PROMPTS, clip_skip=1)
    assert np.abs(a - b).max() <= 1 / 255
    assert np.abs(a - generate(ours, sampler="ddim", prompt=PROMPTS)).max() > 2 / 255
    with pytest.raises(ValueError, match="clip_skip must be an integer from 1 to 1"):
        generate(ours, prompt=PROMPTS, clip_skip=2)
