"""img2img (SDEdit) and inpainting: equal to diffusers' img2img / inpaint pipelines, the known region, inputs, CLI."""
import numpy as np
import PIL.Image
import pytest
from conftest import diffusers_scheduler_of
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.vae import encode_images
from latent_diffusion.diffusion.inpainting import KnownRegionBlend, blend_known_region
from latent_diffusion.diffusion.samplers import Denoiser, get_sampler
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.diffusion.sdedit import strength_timesteps, tail_start

# Our samplers that diffusers' img2img / inpaint pipelines run, with their schedulers; extend as samplers land.
DIFFUSERS_SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
SAMPLERS = list(DIFFUSERS_SCHEDULERS)
PROMPT = "a red circle above a blue square"
STEPS = 10


@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    """A tiny SD-inpainting folder: the tiny components with a 9-channel UNet ([x_t, mask, masked latents])."""
    from latent_diffusion.tiny import tiny_components, tiny_unet_config

    components = tiny_components(scheduler="pndm")
    torch.manual_seed(1)
    components["unet"] = UNet2DConditionModel(**{**tiny_unet_config(), "in_channels": 9}).eval()
    path = tmp_path_factory.mktemp("tiny-sd-inpaint")
    StableDiffusionInpaintPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(path)
    return path


def noise_image(size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8))


def half_mask(size=(32, 32)):
    """White (repaint) on the right half, black (keep) on the left."""
    mask = np.zeros(size, np.uint8)
    mask[:, size[1] // 2:] = 255
    return PIL.Image.fromarray(mask)


def load_ours(folder):
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_theirs(cls, folder, sampler):
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DIFFUSERS_SCHEDULERS[sampler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 7.5, "output_type": "np", **kwargs}
    return pipe(kwargs.pop("prompt", PROMPT), generator=torch.Generator().manual_seed(seed), **kwargs).images


# ----- the strength's tail ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, strength, start", [(10, 0.6, 4), (10, 1.0, 0), (10, 0.05, 9), (25, 0.75, 7), (7, 0.5, 4)])
def test_tail_start_is_diffusers_get_timesteps(n, strength, start):
    init_timestep = min(int(n * strength), n)  # diffusers' get_timesteps, t_start kept below n (one step at least)
    assert tail_start(n, strength) == start == min(max(n - init_timestep, 0), n - 1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_runs_a_tail_of_its_plan_as_diffusers(sd_folder, sampler):
    """The samplers' contract for img2img: x at plan[k] from add_noise, then plan[k:], equal to diffusers' scheduler."""
    scheduler = DIFFUSERS_SCHEDULERS[sampler].from_pretrained(sd_folder, subfolder="scheduler")
    scheduler.set_timesteps(STEPS)
    ours = get_sampler(sampler, NoiseSchedule.from_config(dict(scheduler.config)))
    plan = ours.timesteps(STEPS)
    assert plan.tolist() == scheduler.timesteps.tolist()
    start = tail_start(STEPS, 0.6)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    model = lambda x, t: 0.3 * x + 0.2 * torch.cos(x + t.float() / 100)  # noqa: E731  a smooth stand-in network
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    tail = plan[start:]
    x_ours = ours.add_noise(z0, noise, tail)
    x_theirs = scheduler.add_noise(z0, noise, scheduler.timesteps[start:start + 1].repeat(2))
    assert torch.allclose(x_ours, x_theirs, atol=1e-5)
    ours_out = ours(Denoiser(model, ours.schedule), x_ours, tail, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    for t in scheduler.timesteps[start:]:
        x_theirs = scheduler.step(model(x_theirs, t), t, x_theirs, generator=g).prev_sample
    assert torch.allclose(ours_out, x_theirs, atol=1e-4), (ours_out - x_theirs).abs().max()


# ----- img2img --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_matches_diffusers(sd_folder, sampler, strength):
    ours, theirs = load_ours(sd_folder), load_theirs(StableDiffusionImg2ImgPipeline, sd_folder, sampler)
    image = noise_image()
    a = run(ours, sampler=sampler, image=image, strength=strength)
    b = run(theirs, image=image, strength=strength)
    assert a.shape == b.shape == (1, 32, 32, 3)
    assert np.abs(a - b).max() <= 1 / 255


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpm++_sde", "unipc"])
def test_img2img_with_the_other_samplers_matches_diffusers(sd_folder, sampler):
    cls, extra = diffusers_scheduler_of(sampler)
    ours = load_ours(sd_folder)
    theirs = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = cls.from_config(theirs.scheduler.config, **extra)
    theirs.set_progress_bar_config(disable=True)
    image = noise_image()
    a = run(ours, sampler=sampler, image=image, strength=0.6)
    b = run(theirs, image=image, strength=0.6)
    assert np.abs(a - b).max() <= 1 / 255


def test_img2img_batch_with_generators_matches_diffusers(sd_folder):
    """Two prompts × two images each, one generator per image, a tensor input in [0, 1]."""
    ours, theirs = load_ours(sd_folder), load_theirs(StableDiffusionImg2ImgPipeline, sd_folder, "dpm++")
    image = torch.from_numpy(np.asarray(noise_image(), dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
    kwargs = dict(prompt=[PROMPT, "a cat on a sofa"], image=image, strength=0.7, num_images_per_prompt=2,
                  num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
    a = ours(generator=[torch.Generator().manual_seed(s) for s in range(4)], sampler="dpm++", **kwargs).images
    b = theirs(generator=[torch.Generator().manual_seed(s) for s in range(4)], **kwargs).images
    assert a.shape == (4, 32, 32, 3)
    assert np.abs(a - b).max() <= 1 / 255


def test_img2img_low_strength_stays_near_the_image_and_runs_fewer_steps(sd_folder):
    pipe = load_ours(sd_folder)
    seen = []
    image = noise_image()
    low = run(pipe, image=image, strength=0.2, sampler="ddpm", output_type="latent",
              callback_on_step_end=lambda p, i, t, kw: seen.append(int(t)) or {})
    assert seen == pipe_plan(pipe, "ddpm")[-2:]  # ⌊10 · 0.2⌋ = 2 steps, the plan's last two
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    z0 = encode_images(pipe.vae, pixels, sample=False)
    high = run(pipe, image=image, strength=1.0, sampler="ddpm", output_type="latent")
    assert (low - z0).abs().mean() < (high - z0).abs().mean()


def pipe_plan(pipe, sampler):
    return get_sampler(sampler, NoiseSchedule.from_config(pipe.scheduler.config)).timesteps(STEPS).tolist()


def test_img2img_size_defaults_to_the_image_rounded_down(sd_folder):
    pipe = load_ours(sd_folder)
    assert run(pipe, image=noise_image((48, 64)), num_inference_steps=2).shape == (1, 48, 64, 3)
    assert run(pipe, image=noise_image((50, 70)), num_inference_steps=2).shape == (1, 48, 68, 3)  # multiples of 4
    assert run(pipe, image=noise_image((48, 64)), height=32, width=32, num_inference_steps=2).shape == (1, 32, 32, 3)


def test_img2img_pairs_each_image_with_its_prompt(sd_folder):
    pipe = load_ours(sd_folder)
    images = [noise_image(seed=1), noise_image(seed=2)]
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    batch = pipe([PROMPT, "a cat on a sofa"], image=images, num_images_per_prompt=2, generator=gens,
                 num_inference_steps=4, output_type="np").images
    single = run(pipe, seed=3, prompt="a cat on a sofa", image=images[1], num_inference_steps=4)
    assert np.abs(batch[3] - single[0]).max() < 1e-4


# ----- inpainting -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_unet_matches_diffusers(inpaint_folder, sampler, strength):
    ours, theirs = load_ours(inpaint_folder), load_theirs(StableDiffusionInpaintPipeline, inpaint_folder, sampler)
    assert ours.unet.config.in_channels == 9
    kwargs = dict(image=noise_image(), mask_image=half_mask(), strength=strength)
    a = run(ours, sampler=sampler, **kwargs)
    b = run(theirs, **kwargs)
    assert np.abs(a - b).max() <= 1 / 255


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_with_an_ordinary_unet_matches_diffusers(sd_folder, sampler, strength):
    """The RePaint-style blend. diffusers also VAE-encodes the masked image here, unused by a 4-channel UNet but
    drawing from the generator (which moves DDPM's later noise); handing it latents skips that draw."""
    ours, theirs = load_ours(sd_folder), load_theirs(StableDiffusionInpaintPipeline, sd_folder, sampler)
    kwargs = dict(image=noise_image(), mask_image=half_mask(), strength=strength)
    a = run(ours, sampler=sampler, **kwargs)
    b = run(theirs, masked_image_latents=torch.zeros(1, 4, 16, 16), **kwargs)
    assert np.abs(a - b).max() <= 1 / 255


def test_inpainting_keeps_the_known_region_latent_exactly(sd_folder):
    """After the last step the unmasked region is z_0, the image's posterior sample (the generator's first draw)."""
    pipe = load_ours(sd_folder)
    image = noise_image()
    latents = run(pipe, sampler="ddpm", image=image, mask_image=half_mask(), output_type="latent")  # (1, 4, 16, 16)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    z0 = encode_images(pipe.vae, pixels, torch.Generator().manual_seed(0))
    assert torch.allclose(latents[..., :8], z0[..., :8], atol=1e-6)
    assert not torch.allclose(latents[..., 8:], z0[..., 8:], atol=1e-2)


def test_inpainting_keeps_unmasked_pixels_of_the_default_model():
    """The embedded Shapes model (a trained VAE): repaint the top half's red circle green; the bottom half is kept."""
    pipe = LatentDiffusionPipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle above a blue square on a black background",
                 generator=torch.Generator().manual_seed(0)).images[0]
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[: image.height // 2] = 255
    out = pipe("a green circle above a blue square on a black background", image=image,
               mask_image=PIL.Image.fromarray(mask), generator=torch.Generator().manual_seed(1)).images[0]
    before, after = (np.asarray(i, dtype=np.float32) / 255 for i in (image, out))
    kept, repainted = mask == 0, mask > 0
    assert np.abs(after[kept] - before[kept]).mean() < 0.01  # measured 0.0025
    assert np.abs(after[repainted] - before[repainted]).mean() > 0.03  # measured 0.078
    red, green = (after[repainted][:, c].max() - before[repainted][:, c].max() for c in (0, 1))
    assert green > 0.3 and red < -0.3  # the red circle became green


def test_known_region_blend_renoises_to_the_next_timestep():
    schedule = NoiseSchedule.from_config(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    sampler = get_sampler("ddim", schedule)
    plan = sampler.timesteps(4)
    z0, noise, x = (torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(s)) for s in range(3))
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    blend = KnownRegionBlend(sampler.add_noise, z0, noise, mask, plan)
    after_first = blend(0, plan[0], x)
    alpha_bar = schedule.alphas_cumprod[plan[1]].float()
    known = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise  # q(x_t | x_0) at the next timestep
    assert torch.allclose(after_first, mask * x + (1 - mask) * known)
    assert torch.equal(blend(3, plan[3], x), blend_known_region(x, z0, mask))  # after the last step: z_0 itself


def test_strength_timesteps_keeps_the_plan_tail():
    plan = torch.tensor([901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    assert strength_timesteps(plan, 0.6).tolist() == [501, 401, 301, 201, 101, 1]  # the last ⌊10 · 0.6⌋ = 6
    assert strength_timesteps(plan, 0.01).tolist() == [1]


# ----- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(image=noise_image(), strength=0.0), "strength"),
        (dict(image=noise_image(), strength=1.5), "strength"),
        (dict(image=noise_image(), strength=float("nan")), "strength"),
        (dict(image=noise_image(), strength="0.5"), "strength"),
        (dict(strength=0.5), "strength"),
        (dict(image="in.png"), "image"),
        (dict(image=[]), "image"),
        (dict(image=[noise_image(), torch.zeros(3, 32, 32)]), "image"),
        (dict(image=torch.zeros(4, 32, 32)), "image"),
        (dict(image=noise_image((2, 2))), "image"),
        (dict(image=[noise_image()] * 3, prompt=[PROMPT, PROMPT]), "image"),
        (dict(image=noise_image(), mask_image=42), "mask_image"),
        (dict(mask_image=half_mask()), "mask_image"),
        (dict(image=noise_image(), mask_image=[half_mask()] * 2), "mask_image"),
        (dict(image=noise_image(), latents=torch.zeros(1, 4, 16, 16)), "latents"),
    ],
)
def test_bad_image_input_names_the_argument(sd_folder, kwargs, argument):
    pipe = load_ours(sd_folder)
    with pytest.raises(ValueError, match=argument):
        run(pipe, num_inference_steps=2, **kwargs)


def test_inpainting_unet_needs_image_and_mask(inpaint_folder):
    pipe = load_ours(inpaint_folder)
    with pytest.raises(ValueError, match="mask_image"):
        run(pipe, image=noise_image(), num_inference_steps=2)
    with pytest.raises(ValueError, match="image"):
        run(pipe, num_inference_steps=2)


# ----- CLI ------------------------------------------------------------------------------------------------------


def cli(folder, out, *extra):
    from latent_diffusion.apps.cli import main

    return main(["generate", PROMPT, "-o", str(out), "--model", str(folder), "--steps", "4", "--quiet", *extra])


def test_cli_img2img_and_inpainting_record_their_inputs(sd_folder, tmp_path):
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    noise_image((48, 64)).save(source)
    half_mask((48, 64)).save(mask)
    assert cli(sd_folder, tmp_path / "edit.png", "--image", str(source), "--strength", "0.6") == 0
    edited = PIL.Image.open(tmp_path / "edit.png")
    assert edited.size == (64, 48)
    assert (edited.text["image"], edited.text["strength"]) == (str(source), "0.6")
    assert (edited.text["height"], edited.text["width"]) == ("48", "64") and "mask" not in edited.text
    assert cli(sd_folder, tmp_path / "fill.png", "--image", str(source), "--mask", str(mask)) == 0
    filled = PIL.Image.open(tmp_path / "fill.png")
    assert (filled.text["mask"], filled.text["strength"]) == (str(mask), "1.0")


def test_cli_img2img_matches_the_pipeline(sd_folder, tmp_path):
    source = tmp_path / "in.png"
    noise_image().save(source)
    assert cli(sd_folder, tmp_path / "edit.png", "--image", str(source), "--strength", "0.5", "--seed", "3") == 0
    pipe = load_ours(sd_folder)
    direct = pipe(PROMPT, image=PIL.Image.open(source), strength=0.5, num_inference_steps=4,
                  generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "edit.png")), np.asarray(direct))


@pytest.mark.parametrize("flags, named", [(["--image", "missing.png"], "--image"),
                                          (["--image", "IN", "--mask", "missing.png"], "--mask"),
                                          (["--mask", "IN"], "--mask"),
                                          (["--strength", "0.5"], "--strength")])
def test_cli_refuses_bad_image_flags_by_name(sd_folder, tmp_path, capsys, flags, named):
    source = tmp_path / "in.png"
    noise_image().save(source)
    flags = [str(source) if f == "IN" else str(tmp_path / f) if f.endswith(".png") else f for f in flags]
    assert cli(sd_folder, tmp_path / "x.png", *flags) == 2
    assert named in capsys.readouterr().err
