"""ControlNet in the pipeline: the images of diffusers' ControlNet pipelines (SD, SDXL, img2img, inpainting, several
nets, windows, guess mode, LoRA) within 1/255 on tiny components, loading and saving, argument errors."""
import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import diffusers_scheduler_of
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.models import MultiControlNetModel

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.tiny import tiny_controlnet, tiny_unet_config

PROMPT = "a red circle above a blue square"
SIZE = 32
COMMON = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np", height=SIZE, width=SIZE)
NO_SAFETY = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def picture(seed=0, size=(SIZE, SIZE)):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))


def edges(seed=0):
    """A black picture with a few white lines, as an edge map looks."""
    array = np.zeros((SIZE, SIZE, 3), np.uint8)
    rng = np.random.default_rng(seed)
    for row in rng.integers(0, SIZE, 4):
        array[row, :] = 255
    for col in rng.integers(0, SIZE, 4):
        array[:, col] = 255
    return PIL.Image.fromarray(array)


def half_mask():
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    return PIL.Image.fromarray(mask)


def diff255(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() * 255)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def folder_components(folder):
    """The components of a saved tiny model (its scheduler config as a real checkpoint's) and two ControlNets
    copied from its UNet."""
    components = {k: v for k, v in LatentDiffusionPipeline.from_pretrained(folder).components.items() if v is not None}
    return components, tiny_controlnet(components["unet"], seed=1), tiny_controlnet(components["unet"], seed=2)


@pytest.fixture(scope="module")
def sd(sd_folder):
    return folder_components(sd_folder)


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    return folder_components(sdxl_folder)


def ours(components, controlnet):
    pipe = LatentDiffusionPipeline(**components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs(cls, components, controlnet, sampler="ddim", **extra):
    pipe = cls(**components, controlnet=controlnet, **extra)
    scheduler_cls, settings = (DDIMScheduler, {}) if sampler == "ddim" else diffusers_scheduler_of(sampler)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "heun", "dpm++", "unipc"])
def test_text_to_image_matches_diffusers(sd, sampler):
    components, net, _ = sd
    a = ours(components, net)(PROMPT, control_image=edges(), sampler=sampler, generator=seeded(), **COMMON).images
    b = theirs(StableDiffusionControlNetPipeline, components, net, sampler, **NO_SAFETY)(
        PROMPT, image=edges(), generator=seeded(), **COMMON).images
    plain = ours(components, None)(PROMPT, sampler=sampler, generator=seeded(), **COMMON).images
    assert diff255(a, plain) > 5  # the ControlNet matters
    assert diff255(a, b) <= 1


def test_scale_window_and_guess_mode_match_diffusers(sd):
    components, net, _ = sd
    control = dict(controlnet_conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7)
    for guess_mode in (False, True):
        a = ours(components, net)(PROMPT, control_image=edges(), guess_mode=guess_mode, generator=seeded(),
                                  sampler="ddim", **control, **COMMON).images
        b = theirs(StableDiffusionControlNetPipeline, components, net, **NO_SAFETY)(
            PROMPT, image=edges(), guess_mode=guess_mode, generator=seeded(), **control, **COMMON).images
        assert diff255(a, b) <= 1


def test_zero_scale_is_the_plain_model(sd):
    components, net, _ = sd
    a = ours(components, net)(PROMPT, control_image=edges(), controlnet_conditioning_scale=0.0, sampler="ddim",
                              generator=seeded(), **COMMON).images
    b = ours(components, None)(PROMPT, sampler="ddim", generator=seeded(), **COMMON).images
    assert diff255(a, b) <= 1e-3


def test_two_controlnets_and_a_batch_match_diffusers(sd):
    components, net_1, net_2 = sd
    prompts = [PROMPT, "a green triangle"]
    control = dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.3],
                   control_guidance_end=[1.0, 0.8], num_images_per_prompt=2)
    images = [[edges(0), edges(1)], picture(3)]  # net 1: one image per prompt; net 2: one for all
    a = ours(components, [net_1, net_2])(prompts, control_image=images, sampler="ddim", generator=seeded(),
                                         **control, **COMMON).images
    b = theirs(StableDiffusionControlNetPipeline, components, MultiControlNetModel([net_1, net_2]), **NO_SAFETY)(
        prompts, image=[[edges(0), picture(3)], [edges(1), picture(3)]],  # diffusers: per prompt, one per net
        generator=seeded(), **control, **COMMON).images
    assert a.shape == (4, SIZE, SIZE, 3)
    assert diff255(a, b) <= 1


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_img2img_matches_diffusers(sd, sampler):
    components, net, _ = sd
    inputs = dict(image=picture(5), strength=0.7, control_image=edges(), control_guidance_end=0.6,
                  controlnet_conditioning_scale=1.0)  # diffusers' img2img and inpaint default: 0.8
    a = ours(components, net)(PROMPT, sampler=sampler, generator=seeded(), **inputs, **COMMON).images
    b = theirs(StableDiffusionControlNetImg2ImgPipeline, components, net, sampler, **NO_SAFETY)(
        PROMPT, generator=seeded(), **inputs, **COMMON).images
    assert diff255(a, b) <= 1


@pytest.mark.parametrize("channels", [4, 9])
def test_inpainting_matches_diffusers(sd, channels):
    components, net, _ = sd
    if channels == 9:  # an inpainting UNet ([x_t, mask, masked latents]); the ControlNet reads x_t only
        torch.manual_seed(3)
        components = {**components, "unet": UNet2DConditionModel(**{**tiny_unet_config(), "in_channels": 9}).eval()}
    inputs = dict(image=picture(5), mask_image=half_mask(), control_image=edges(), strength=0.9,
                  controlnet_conditioning_scale=0.8)
    a = ours(components, net)(PROMPT, sampler="ddim", generator=seeded(), **inputs, **COMMON).images
    b = theirs(StableDiffusionControlNetInpaintPipeline, components, net, **NO_SAFETY)(
        PROMPT, generator=seeded(), **inputs, **COMMON).images
    assert diff255(a, b) <= 1


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_matches_diffusers(sdxl, guess_mode):
    components, net_1, net_2 = sdxl
    control = dict(guess_mode=guess_mode, controlnet_conditioning_scale=[1.0, 0.7], guidance_scale=5.0)
    a = ours(components, [net_1, net_2])(PROMPT, control_image=[edges(), picture(2)], sampler="euler",
                                         generator=seeded(), **{**COMMON, **control}).images
    b = theirs(StableDiffusionXLControlNetPipeline, components, MultiControlNetModel([net_1, net_2]), "euler",
               add_watermarker=False)(PROMPT, image=[edges(), picture(2)], generator=seeded(),
                                      **{**COMMON, **control}).images
    plain = ours(components, None)(PROMPT, sampler="euler", generator=seeded(), **{**COMMON, "guidance_scale": 5.0})
    assert diff255(a, plain.images) > 5
    assert diff255(a, b) <= 1


def test_sdxl_img2img_matches_diffusers(sdxl):
    components, net, _ = sdxl
    inputs = dict(image=picture(5), strength=0.6, control_image=edges(), guidance_scale=5.0,
                  controlnet_conditioning_scale=1.0)
    a = ours(components, net)(PROMPT, sampler="euler", generator=seeded(), **{**COMMON, **inputs}).images
    b = theirs(StableDiffusionXLControlNetImg2ImgPipeline, components, net, "euler", add_watermarker=False,
               requires_aesthetics_score=False)(PROMPT, generator=seeded(), **{**COMMON, **inputs}).images
    assert diff255(a, b) <= 1


def test_lora_and_controlnet_match_diffusers(sd_folder, tmp_path):
    from test_lora_loading import make_lora

    lora = make_lora(sd_folder, tmp_path / "lora")
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    net = tiny_controlnet(pipe.unet)
    net.save_pretrained(tmp_path / "controlnet")
    a_pipe = LatentDiffusionPipeline.from_pretrained(sd_folder, controlnet=str(tmp_path / "controlnet"))
    b_pipe = StableDiffusionControlNetPipeline.from_pretrained(
        sd_folder, controlnet=ControlNetModel.from_pretrained(tmp_path / "controlnet"), **NO_SAFETY)
    b_pipe.scheduler = DDIMScheduler.from_config(b_pipe.scheduler.config)
    for pipe in (a_pipe, b_pipe):
        pipe.set_progress_bar_config(disable=True)
    a_pipe.load_lora_weights(lora)
    b_pipe.load_lora_weights(str(lora).rsplit("/", 1)[0])
    a = a_pipe(PROMPT, control_image=edges(), sampler="ddim", generator=seeded(), **COMMON).images
    b = b_pipe(PROMPT, image=edges(), generator=seeded(), **COMMON).images
    assert diff255(a, b) <= 1


def test_saved_pipeline_is_a_diffusers_controlnet_folder(sd, tmp_path):
    components, net, _ = sd
    ours(components, net).save_pretrained(tmp_path / "with-controlnet")
    index = json.loads((tmp_path / "with-controlnet" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionControlNetPipeline"
    loaded = StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "with-controlnet")
    assert isinstance(loaded.controlnet, ControlNetModel)
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "with-controlnet")
    assert isinstance(again.controlnet, ControlNetModel)
    ours(components, None).save_pretrained(tmp_path / "plain")
    index = json.loads((tmp_path / "plain" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "controlnet" not in index


def test_size_defaults_to_the_control_image(sd):
    components, net, _ = sd
    image = ours(components, net)(PROMPT, control_image=picture(size=(24, 40)), num_inference_steps=2,
                                  sampler="ddim").images[0]
    assert image.size == (40, 24)


@pytest.mark.parametrize("kwargs, message", [
    (dict(controlnet_conditioning_scale=[1.0, 1.0]), "controlnet_conditioning_scale holds 2 values"),
    (dict(control_guidance_start=0.8, control_guidance_end=0.5), "control_guidance_start (0.8) must be below"),
    (dict(control_guidance_end=1.5), "control_guidance_end must be a finite number"),
    (dict(control_image=None), "give control_image="),
    (dict(control_image="edges.png"), "control_image must be a PIL image"),
])
def test_bad_control_arguments_are_named(sd, kwargs, message):
    components, net, _ = sd
    with pytest.raises(ValueError) as error:
        ours(components, net)(PROMPT, **{"control_image": edges(), "num_inference_steps": 2, **kwargs})
    assert message in str(error.value)


def test_controlnet_for_another_vae_is_named(sd):
    components, _, _ = sd
    net = ControlNetModel.from_unet(components["unet"])  # diffusers' default: control images downsampled by 8
    with pytest.raises(ValueError, match="controlnet 0 downsamples control images by 8 but this model's VAE by 2"):
        ours(components, net)(PROMPT, control_image=edges(), num_inference_steps=2)


def test_control_image_without_controlnet_is_named(sd):
    with pytest.raises(ValueError, match="control_image needs a ControlNet"):
        ours(sd[0], None)(PROMPT, control_image=edges(), num_inference_steps=2)


def test_bad_controlnet_paths_are_named(tmp_path):
    from latent_diffusion.pipelines.controlnet import load_controlnet

    with pytest.raises(ValueError, match="does not exist"):
        load_controlnet(str(tmp_path / "missing"))
    (tmp_path / "net.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        load_controlnet(str(tmp_path / "net.safetensors"))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only pickle weights"):
        load_controlnet(str(tmp_path / "pickled"))
