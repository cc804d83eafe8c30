"""`GenerationSettings`: pipeline kwargs, PNG metadata and back, batches, image inputs, one home for the defaults."""
import numpy as np
import PIL.Image
import pytest
import torch

from latent_diffusion.diffusion.sdedit import IMG2IMG_STRENGTH, INPAINT_STRENGTH
from latent_diffusion.formats.pngmeta import read_png_metadata, save_png
from latent_diffusion.settings import FALLBACK_DEFAULTS, GenerationSettings, batch_pipeline_kwargs

PROMPT = "a red circle above a blue square"


class FakePipe:
    """What `resolved` reads of a pipeline: its defaults and how it resolves a size (native 32 px)."""

    generation_defaults = {"num_inference_steps": 9, "guidance_scale": 6.0, "sampler": "ddim"}

    def resolve_size(self, height, width):
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {value}")
        return height or 32, width or 32


def full_settings(**changes):
    settings = GenerationSettings(
        prompt=PROMPT, negative_prompt="blurry", steps=4, guidance=3.5, guidance_rescale=0.25, sampler="euler",
        sigma_schedule="karras", eta=0.5, seed=11, height=48, width=64, n=1, clip_skip=1,
        loras=("a.safetensors", "b.safetensors:0.5"), model="some/model")
    return settings.replace(**changes)


def test_pipeline_kwargs_are_the_call_of_n_images():
    kwargs = full_settings(n=3).pipeline_kwargs()
    generators = kwargs.pop("generator")
    assert kwargs == dict(prompt=[PROMPT] * 3, negative_prompt=["blurry"] * 3, num_inference_steps=4,
                          guidance_scale=3.5, guidance_rescale=0.25, sampler="euler", sigma_schedule="karras",
                          eta=0.5, height=48, width=64, clip_skip=1)
    expected = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    assert all(torch.equal(g.get_state(), e.get_state()) for g, e in zip(generators, expected))
    assert GenerationSettings(prompt="p").pipeline_kwargs()["negative_prompt"] is None  # None, not [""]: SDXL's zeros


def test_round_trip_through_a_png_file(tmp_path):
    settings = full_settings()
    path = save_png(PIL.Image.new("RGB", (64, 48)), tmp_path / "x.png", settings.png_metadata())
    assert GenerationSettings.from_png_metadata(read_png_metadata(path)) == settings


def test_round_trip_of_defaults_resolves_them_from_the_model():
    [record] = GenerationSettings(prompt="p", seed=5).resolved(FakePipe()).for_images([PIL.Image.new("RGB", (32, 32))])
    back = GenerationSettings.from_png_metadata(record.png_metadata())
    assert back == GenerationSettings(prompt="p", seed=5, steps=9, guidance=6.0, sampler="ddim", height=32, width=32)
    assert back.model is None and record.png_metadata()["model"] == "embedded default"
    with pytest.raises(ValueError, match="height"):
        GenerationSettings(prompt="p", height=30).resolved(FakePipe())


def test_each_image_of_a_request_records_its_own_seed_and_size():
    images = [PIL.Image.new("RGB", (64, 48)), PIL.Image.new("RGB", (64, 48))]
    records = full_settings(n=2, height=None, width=None).resolved(FakePipe()).for_images(images)
    assert [(r.seed, r.n, r.height, r.width) for r in records] == [(11, 1, 48, 64), (12, 1, 48, 64)]
    assert [r.png_metadata()["seed"] for r in records] == ["11", "12"]


def test_png_keys_are_the_ones_generate_has_always_written():
    meta = GenerationSettings(prompt="p", steps=3, guidance=4.0, sampler="ddim", height=32, width=32).png_metadata()
    assert list(meta) == ["prompt", "negative_prompt", "seed", "sampler", "steps", "guidance", "guidance_rescale",
                          "eta", "height", "width", "model", "versions"]
    assert [meta[k] for k in ("negative_prompt", "seed", "steps", "guidance", "guidance_rescale", "eta")] == [
        "", "0", "3", "4.0", "0.0", "0.0"]


def test_image_inputs_open_paths_record_them_and_take_the_default_strength(tmp_path):
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    PIL.Image.fromarray(np.full((16, 24, 3), 200, np.uint8)).save(source)
    PIL.Image.new("L", (24, 16), 255).save(mask)
    edit = GenerationSettings(prompt="p", image=str(source))
    kwargs = edit.pipeline_kwargs()
    assert kwargs["image"].size == (24, 16) and "mask_image" not in kwargs and "strength" not in kwargs
    assert edit.resolved(FakePipe()).strength == IMG2IMG_STRENGTH
    inpaint = edit.replace(mask=str(mask)).resolved(FakePipe())
    assert inpaint.strength == INPAINT_STRENGTH
    meta = inpaint.png_metadata()
    assert (meta["image"], meta["mask"], meta["strength"]) == (str(source), str(mask), str(INPAINT_STRENGTH))
    assert GenerationSettings.from_png_metadata(meta) == inpaint
    picture = edit.replace(image=PIL.Image.open(source), strength=0.5).resolved(FakePipe())
    assert "image" not in picture.png_metadata() and picture.png_metadata()["strength"] == "0.5"
    with pytest.raises(FileNotFoundError, match="mask: no such file"):
        edit.replace(mask=str(tmp_path / "missing.png")).pipeline_kwargs()


def test_a_batch_of_requests_is_one_call_and_must_share_the_rest():
    a, b = GenerationSettings(prompt="a", seed=3, n=2, steps=2), GenerationSettings(prompt="b", seed=9, steps=2)
    kwargs = batch_pipeline_kwargs([a, b])
    assert kwargs["prompt"] == ["a", "a", "b"] and len(kwargs["generator"]) == 3
    assert kwargs["generator"][2].initial_seed() == 9
    with pytest.raises(ValueError, match="differ only in prompt"):
        batch_pipeline_kwargs([a, b.replace(steps=3)])


def test_from_png_metadata_names_what_is_missing():
    with pytest.raises(ValueError, match="no generation settings in this image .missing seed, sampler"):
        GenerationSettings.from_png_metadata({"prompt": "p"})


def test_the_pipeline_falls_back_to_the_one_set_of_defaults(sd_folder):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline(**{k: v for k, v in LatentDiffusionPipeline.from_pretrained(
        str(sd_folder)).components.items()})
    assert pipe.generation_defaults == FALLBACK_DEFAULTS
