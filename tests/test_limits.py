"""Memory and work bounds of a pipeline call (latent_diffusion/limits.py) and model-config sanity checks."""
import json
import shutil

import pytest
import torch

from latent_diffusion.limits import (GIB, MAX_IMAGES_PER_CALL, MAX_PROMPT_CHARS, check_call_size, check_model_config,
                                     estimate_call_memory, network_calls, work_units)
from latent_diffusion.apps.cli import main as cli_main

SD15_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, sample_size=64)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=512)


def largest_side(budget_gib, dtype, images=1):
    """The largest square side (multiple of 64) an SD-1.5 call fits in `budget_gib` by the estimate."""
    side = 64
    while estimate_call_memory(SD15_UNET, SD15_VAE, images, side + 64, side + 64, True, 8, dtype) <= budget_gib * GIB:
        side += 64
    return side


def test_sd15_on_a_24_gib_machine():
    """8192² (the argument checks' maximum) is refused on 24 GiB; 512² and 1024² fit; the documented maxima hold."""
    budget = 24 * GIB
    with pytest.raises(ValueError, match=r"height × width \(8192×8192\) needs about .* GiB for this model, more than "
                                         r"the 24 GiB available"):
        check_call_size(SD15_UNET, SD15_VAE, images=1, height=8192, width=8192, guided=True, dtype=torch.float16,
                        budget=budget)
    for side in (512, 1024):
        assert check_call_size(SD15_UNET, SD15_VAE, images=1, height=side, width=side, guided=True,
                               dtype=torch.float16, budget=budget) < budget
    assert largest_side(24, torch.float16) == 3520  # docs/bad_inputs.md
    assert largest_side(24, torch.float32) == 2496


def test_many_images_name_the_count():
    with pytest.raises(ValueError, match=r"num_images_per_prompt \(64\) needs about"):
        check_call_size(SD15_UNET, SD15_VAE, images=64, height=1024, width=1024, guided=True, budget=24 * GIB)
    with pytest.raises(ValueError, match=f"--n asks for 100000 images in one call; at most {MAX_IMAGES_PER_CALL}"):
        check_call_size(SD15_UNET, SD15_VAE, images=100000, height=64, width=64, guided=True, names={"images": "--n"})


def test_estimate_grows_with_pixels_and_images():
    one = estimate_call_memory(SD15_UNET, SD15_VAE, 1, 512, 512, True)
    assert estimate_call_memory(SD15_UNET, SD15_VAE, 2, 512, 512, True) == 2 * one
    assert estimate_call_memory(SD15_UNET, SD15_VAE, 1, 1024, 1024, True) == 4 * one
    assert estimate_call_memory(SD15_UNET, SD15_VAE, 1, 512, 512, True, dtype=torch.float16) < one


def test_work_units_count_network_calls():
    assert network_calls("heun", 1000) == 1999 and network_calls("ddim", 50) == 50
    assert work_units(8, 64, 64, "heun", 10, guided=True) == 64 * 64 * 8 * 2 * 19


@pytest.mark.parametrize("config, message", [
    ({"sample_size": 10 ** 6}, "sample_size must be an integer from 1 to 1024, got 1000000"),
    ({"block_out_channels": [320, 10 ** 9]}, "block_out_channels must be a list of integers from 1 to 8192"),
    ({"in_channels": "four"}, "in_channels must be an integer from 1 to 8192, got 'four'"),
    ({"layers_per_block": 1000}, "layers_per_block must be an integer from 1 to 32, got 1000"),
], ids=["sample_size", "channels", "in_channels_type", "layers"])
def test_absurd_model_configs(config, message):
    with pytest.raises(ValueError, match="unet/config.json " + message.replace("[", r"\[")):
        check_model_config(config, "unet/config.json", 1024)


# ----------------------------------------------------------------------------- wired into the pipeline and the CLI


@pytest.fixture(scope="module")
def pipe(sd_folder):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_refuses_a_call_over_the_budget(pipe, monkeypatch):
    monkeypatch.setenv("LATENT_DIFFUSION_MEMORY_GIB", "0.001")  # 1 MiB: a 512² image of the tiny model needs more
    with pytest.raises(ValueError, match=r"height × width \(512×512\) needs about"):
        pipe("a red circle", num_inference_steps=1, height=512, width=512)
    monkeypatch.setenv("LATENT_DIFFUSION_MEMORY_GIB", "1")
    assert pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="np").images.shape == (1, 32, 32, 3)


def test_pipeline_refuses_a_huge_prompt(pipe):
    with pytest.raises(ValueError, match=f"prompt must be at most {MAX_PROMPT_CHARS} characters, got 1000000"):
        pipe("x" * 10 ** 6, num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_prompt must be at most"):
        pipe("a", negative_prompt="y" * (MAX_PROMPT_CHARS + 1), num_inference_steps=1)


@pytest.mark.parametrize("flags, message", [
    (["--n", "100000"], f"--n must be an integer >= 1 and <= {MAX_IMAGES_PER_CALL}, got 100000"),
    (["--height", "8192", "--width", "8192"], "--height × --width (8192×8192) needs about"),
    (["--n", "200", "--height", "64", "--width", "64"], "--n (200) needs about"),
], ids=["n", "8192", "n_times_size"])
def test_cli_names_the_flag_over_the_budget(sd_folder, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setenv("LATENT_DIFFUSION_MEMORY_GIB", "0.05")
    out = tmp_path / "x.png"
    assert cli_main(["generate", "a", "-o", str(out), "--quiet", "--model", str(sd_folder), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_cli_refuses_a_1mb_prompt(tmp_path, capsys):
    assert cli_main(["generate", "x" * 10 ** 6, "-o", str(tmp_path / "x.png")]) == 2
    assert f"prompt must be at most {MAX_PROMPT_CHARS} characters" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, message", [
    ("sample_size", 10 ** 6, "unet/config.json sample_size must be an integer from 1 to 1024, got 1000000"),
    ("block_out_channels", [8, 10 ** 7], "unet/config.json block_out_channels must be a list of integers"),
], ids=["sample_size", "channels"])
def test_from_pretrained_refuses_absurd_configs(sd_folder, tmp_path, key, value, message):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    folder = tmp_path / "model"
    shutil.copytree(sd_folder, folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pretrained_model_name_or_path .*" + message):
        LatentDiffusionPipeline.from_pretrained(str(folder))


@pytest.mark.parametrize("file, text, message", [
    ("model_index.json", "{not json", "model_index.json is not valid JSON"),
    ("unet/config.json", "[1, 2]", "unet/config.json must hold a JSON object, got list"),
    ("scheduler/scheduler_config.json", '"text"', "scheduler/scheduler_config.json must hold a JSON object, got str"),
], ids=["invalid", "list", "string"])
def test_model_json_files_are_named(sd_folder, tmp_path, capsys, file, text, message):
    folder = tmp_path / "model"
    shutil.copytree(sd_folder, folder)
    (folder / file).write_text(text)
    assert cli_main(["generate", "a", "-o", str(tmp_path / "x.png"), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and "--model" in err and "Traceback" not in err
