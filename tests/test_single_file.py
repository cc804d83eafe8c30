"""Single-file checkpoints in the original SD layout: ours against diffusers' from_single_file, both ways."""
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.formats import ldm_layout
from latent_diffusion.formats.single_file import CONFIGS_KEY, TOKENIZERS_KEY, load_vae_file

PROMPT = "a red circle above a blue square"


def sd2_components():
    """Tiny SD 2.x: an OpenCLIP-style (GELU) text encoder, v-prediction."""
    from transformers import CLIPTextModel

    from latent_diffusion.tiny import tiny_components

    parts = tiny_components(prediction_type="v_prediction", scheduler="ddim")
    torch.manual_seed(2)
    config = parts["text_encoder"].config.to_dict()
    parts["text_encoder"] = CLIPTextModel(type(parts["text_encoder"].config).from_dict({**config, "hidden_act": "gelu"})).eval()
    return parts


def inpaint_components():
    from latent_diffusion.tiny import tiny_components, tiny_unet_config

    parts = tiny_components(scheduler="ddim")
    torch.manual_seed(1)
    parts["unet"] = UNet2DConditionModel(**{**tiny_unet_config(), "in_channels": 9}).eval()
    return parts


def sd1_components():
    from latent_diffusion.tiny import tiny_components

    return tiny_components(scheduler="ddim")


def sdxl_components():
    """Tiny SDXL whose second encoder is wider than the first (48 against 32 features), as in SDXL (1280, 768):
    diffusers' from_single_file tells the two encoders apart by width alone."""
    from transformers import CLIPTextModelWithProjection

    from latent_diffusion.tiny import tiny_sdxl_components, tiny_sdxl_unet_config

    parts = tiny_sdxl_components(scheduler="ddim")
    config = parts["text_encoder_2"].config.to_dict()
    torch.manual_seed(3)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(
        type(parts["text_encoder_2"].config).from_dict({**config, "hidden_size": 48, "intermediate_size": 60})).eval()
    parts["unet"] = UNet2DConditionModel(**tiny_sdxl_unet_config(cross_attention_dim=32 + 48)).eval()
    return parts


VARIANTS = {  # name: (components, the diffusers pipeline class, its extra keyword arguments)
    "sd1": (sd1_components, StableDiffusionPipeline, dict(safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False)),
    "sd2-v": (sd2_components, StableDiffusionPipeline, dict(safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)),
    "sdxl": (sdxl_components, StableDiffusionXLPipeline, dict(add_watermarker=False)),
    "inpaint": (inpaint_components, StableDiffusionInpaintPipeline, dict(safety_checker=None, feature_extractor=None,
                                                                         requires_safety_checker=False)),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, our pipeline, its diffusers folder, its single file written by save_single_file in float32)."""
    make, cls, extra = VARIANTS[request.param]
    parts = make()
    root = tmp_path_factory.mktemp(request.param)
    cls(**parts, **extra).save_pretrained(root / "folder")
    ours = LatentDiffusionPipeline(**parts)
    ours.set_progress_bar_config(disable=True)
    file = ours.save_single_file(root / "model.safetensors", dtype=None)
    return request.param, ours, root / "folder", file


def generate(pipe, name, **kwargs):
    if name == "inpaint":
        rng = np.random.default_rng(0)
        mask = np.zeros((32, 32), np.uint8)
        mask[:, 16:] = 255
        kwargs.update(image=(rng.random((32, 32, 3)) * 255).astype(np.uint8), mask_image=mask)
        import PIL.Image
        kwargs.update(image=PIL.Image.fromarray(kwargs["image"]), mask_image=PIL.Image.fromarray(mask))
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0), height=32, width=32, **kwargs).images


def diffusers_from_single_file(name, file, folder):
    cls = VARIANTS[name][1]
    extra = {} if name == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_single_file(str(file), config=str(folder), local_files_only=True, **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_file_reads_back_exactly(variant):
    name, ours, _, file = variant
    back = LatentDiffusionPipeline.from_single_file(file)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(ours, part) is not None:
            assert state_dicts_equal(getattr(ours, part), getattr(back, part)), part
    assert back.scheduler.config.prediction_type == ours.scheduler.config.prediction_type
    assert np.abs(generate(back, name, sampler="ddim") - generate(ours, name, sampler="ddim")).max() == 0


def test_diffusers_reads_our_file_into_the_same_weights_and_image(variant):
    """diffusers' own converters (convert_ldm_*) invert our layout exactly, and its pipeline draws our image."""
    name, ours, folder, file = variant
    theirs = diffusers_from_single_file(name, file, folder)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(ours, part) is not None:
            assert state_dicts_equal(getattr(ours, part), getattr(theirs, part)), part
    mine = LatentDiffusionPipeline.from_single_file(file)
    mine.set_progress_bar_config(disable=True)
    assert np.abs(generate(mine, name, sampler="ddim") - generate(theirs, name)).max() <= 1 / 255


def test_file_without_our_metadata_loads_with_a_config_folder(variant, tmp_path):
    """A file from another tool: its configs and tokenizer come from `config=` as in diffusers."""
    name, ours, folder, file = variant
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(file), str(bare))
    with pytest.raises(ValueError, match="holds no tokenizer"):
        LatentDiffusionPipeline.from_single_file(bare)
    with pytest.raises(ValueError, match="must be a diffusers folder"):
        LatentDiffusionPipeline.from_single_file(bare, config=tmp_path)
    loaded = LatentDiffusionPipeline.from_single_file(bare, config=folder)
    assert state_dicts_equal(loaded.unet, ours.unet)
    assert loaded.scheduler.config.prediction_type == ours.scheduler.config.prediction_type


def test_tiny_file_without_configs_names_what_does_not_fit(variant, tmp_path):
    """No metadata and no config=: the released family's shipped configs, which a tiny UNet does not fit."""
    name, ours, _, file = variant
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(file), str(bare))
    tokenizers = {"tokenizer": ours.tokenizer, "tokenizer_2": ours.tokenizer_2}
    with pytest.raises(ValueError, match="does not fit its configuration"):
        LatentDiffusionPipeline.from_single_file(bare, **tokenizers)


def test_family_and_inpainting_detected_from_keys(variant):
    name, _, _, file = variant
    with safe_open(str(file), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    from latent_diffusion.formats.single_file import detect_family, shipped_configs

    family = detect_family(dict.fromkeys(keys))
    assert family == {"sd1": "sd1", "sd2-v": "sd2", "sdxl": "sdxl", "inpaint": "sd1"}[name]
    shipped = shipped_configs(family, load_file(file))
    assert shipped["unet"]["in_channels"] == (9 if name == "inpaint" else 4)
    assert json.loads(metadata[CONFIGS_KEY])["unet"]["in_channels"] == shipped["unet"]["in_channels"]
    assert "tokenizer" in json.loads(metadata[TOKENIZERS_KEY])
    assert metadata["modelspec.architecture"].startswith("stable-diffusion")


def test_shipped_configs_describe_the_released_models():
    """The family configs build models of the released sizes (SD 1.5's UNet: 859.5M parameters; SDXL's: 2.57B)."""
    from latent_diffusion.formats.single_file import shipped_configs

    fake = {ldm_layout.UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_configs("sd1", fake)["unet"])
        xl = UNet2DConditionModel.from_config(shipped_configs("sdxl", fake)["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in xl.parameters()) == 2_567_463_684


def test_default_save_is_half_precision(tmp_path):
    pipe = LatentDiffusionPipeline(**sd1_components())
    file = pipe.save_single_file(tmp_path / "half.safetensors")
    tensors = load_file(file)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in tensors)
    back = LatentDiffusionPipeline.from_single_file(file)
    assert back.unet.dtype == torch.float32
    weight = pipe.unet.conv_in.weight
    assert torch.equal(back.unet.conv_in.weight, weight.half().float())


def test_from_pretrained_takes_a_file_and_vae_file_replaces_the_vae(variant, tmp_path):
    name, ours, _, file = variant
    if name != "sd1":
        pytest.skip("one family is enough for the entry points")
    pipe = LatentDiffusionPipeline.from_pretrained(str(file))
    assert state_dicts_equal(pipe.unet, ours.unet)
    vae_only = tmp_path / "vae.safetensors"  # A VAE-only release: bare encoder./decoder. keys
    save_file({k.removeprefix(ldm_layout.VAE_PREFIX): v for k, v in load_file(file).items()
               if k.startswith(ldm_layout.VAE_PREFIX)}, str(vae_only))
    vae = load_vae_file(vae_only, pipe.vae.config)
    assert state_dicts_equal(vae, ours.vae)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    file = tmp_path / f"model{suffix}"
    file.write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        LatentDiffusionPipeline.from_pretrained(str(file))


def test_truncated_and_unknown_files_are_refused(tmp_path):
    pipe = LatentDiffusionPipeline(**sd1_components())
    file = pipe.save_single_file(tmp_path / "m.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        LatentDiffusionPipeline.from_single_file(cut)
    other = tmp_path / "other.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="original layout"):
        LatentDiffusionPipeline.from_single_file(other)


# ----------------------------------------------------------------------------- the command line


def test_generate_takes_a_single_file_and_a_vae_file(variant, tmp_path):
    from latent_diffusion.apps.cli import main

    name, ours, _, file = variant
    if name != "sd1":
        pytest.skip("one family is enough for the command line")
    vae_only = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in load_file(file).items() if k.startswith(ldm_layout.VAE_PREFIX)}, str(vae_only))
    args = ["generate", PROMPT, "--model", str(file), "--steps", "2", "--quiet", "--sampler", "ddim"]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--vae", str(vae_only), "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() != b"" and (tmp_path / "b.png").exists()


def bad_file(kind, tmp_path):
    """A model file of one bad kind: a pickle, a truncated safetensors, a safetensors in no layout we know."""
    if kind == "pickle":
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"\x80\x04not really")
        return path
    path = tmp_path / f"{kind}.safetensors"
    save_file({"some.weight": torch.zeros(64)}, str(path))
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-10])
    return path


BAD_FILES = [("pickle", "is a pickle (.ckpt); pickle checkpoints are never unpickled"),
             ("truncated", "is truncated"),
             ("unknown", "not a Stable Diffusion checkpoint in the original layout")]


@pytest.mark.parametrize("kind, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_generate_refuses_bad_model_files(tmp_path, capsys, monkeypatch, kind, message):
    from latent_diffusion.apps.cli import main

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    assert main(["generate", PROMPT, "--model", str(bad_file(kind, tmp_path)), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("kind, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_vae_flag_refuses_bad_files(sd_folder, tmp_path, capsys, kind, message):
    from latent_diffusion.apps.cli import main

    if kind == "unknown":
        message = "the VAE does not fit its configuration"
    flags = ["--model", str(sd_folder), "--vae", str(bad_file(kind, tmp_path)), "--steps", "1", "--quiet"]
    assert main(["generate", PROMPT, *flags, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--vae" in err and message in err and "Traceback" not in err
