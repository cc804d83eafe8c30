"""Bad input at every entry point gets a one-line error naming the argument; usage errors exit with status 2.

The table covers the `generate` and `eval` commands, the pipeline call, `from_pretrained`, and the
training script; then the numerical guards (NaN latents, NaN loss, fp16 VAE overflow). In-process calls
where the exit status is returned; a few subprocesses prove the status and that no traceback is printed.
"""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latent_diffusion.checks import NonFiniteError
from latent_diffusion.apps.cli import main as cli_main
from test_data import make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_text2img.py"


# ----------------------------------------------------------------------------- model folders that are wrong


def broken_model(kind, sd_folder, tmp_path):
    """A model path of one bad kind, made from the tiny SD folder."""
    folder = tmp_path / kind
    unet_weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if kind == "missing":
        return str(tmp_path / "no" / "such" / "model")
    if kind == "empty":
        folder.mkdir()
    elif kind == "file":
        folder.write_text("not a model")
    else:
        shutil.copytree(sd_folder, folder)
        if kind == "truncated":
            data = unet_weights.read_bytes()
            unet_weights.write_bytes(data[: len(data) // 2])
        elif kind == "pickle_only":  # what an old checkpoint looks like: a .bin where safetensors should be
            torch.save({"w": torch.zeros(1)}, folder / "unet" / "diffusion_pytorch_model.bin")
            unet_weights.unlink()
    return str(folder)


MODEL_CASES = [
    ("missing", "does not exist"),
    ("empty", r"is missing \['model_index.json', 'unet'"),
    ("file", "is a file"),
    ("truncated", "unet/ diffusion_pytorch_model.safetensors is truncated"),
    ("pickle_only", r"unet/ holds only pickle weights \['diffusion_pytorch_model.bin'\]; they are never unpickled"),
]


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load must never run on a file a user points at."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("kind, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_from_pretrained_refuses_bad_model_paths(sd_folder, tmp_path, no_unpickling, kind, message):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    with pytest.raises(ValueError, match=f"pretrained_model_name_or_path .*{message}"):
        LatentDiffusionPipeline.from_pretrained(broken_model(kind, sd_folder, tmp_path))


def test_from_pretrained_refuses_an_empty_path():
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    with pytest.raises(ValueError, match="pretrained_model_name_or_path must be a diffusers folder or a Hub id"):
        LatentDiffusionPipeline.from_pretrained("")


# ----------------------------------------------------------------------------- latent-diffusion generate / eval


def generate(*flags, model=None, output=None, tmp_path=None):
    return cli_main(["generate", "a red circle", "-o", str(output or tmp_path / "x.png"), "--quiet",
                     *(["--model", str(model)] if model else []), *map(str, flags)])


GENERATE_CASES = [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--steps", "-3"], "--steps must be an integer >= 1, got -3"),
    (["--n", "0"], "--n must be an integer >= 1, got 0"),
    (["--sampler", "nope"], "--sampler must be one of ("),
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number >= 0, got inf"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1"),
    (["--guidance-rescale", "nan"], "--guidance-rescale must be a finite number >= 0 <= 1, got nan"),
    (["--eta", "inf"], "--eta must be a finite number >= 0, got inf"),
    (["--height", "100000"], "--height must be an integer >= 1 and <= 8192, got 100000"),
    (["--width", "0"], "--width must be an integer >= 1 and <= 8192, got 0"),
    (["--height", "30"], "height must be a positive multiple of 4 and at most 8192 for this model, got 30"),
    (["--from-png", "missing.png"], "--from-png: no such file 'missing.png'"),
    (["--vae", "/no/such/vae.safetensors"], "--vae '/no/such/vae.safetensors' does not exist"),
    (["--vae", "vae.pt"], "--vae 'vae.pt' is a pickle (.pt); pickle checkpoints are never unpickled"),
    (["--model-config", "/some/folder"], "--model-config is for a single-file --model"),
    (["--n", "-1"], "--n must be an integer >= 1, got -1"),
    (["--n", "100000"], "--n must be an integer >= 1 and <= 256, got 100000"),
    (["--seed", "-1"], "--seed must be an integer >= 0 and <= 18446744073709551615, got -1"),
    (["--seed", str(2 ** 64)], "--seed must be an integer >= 0 and <= 18446744073709551615, got 18446744073709551616"),
    (["--seed", str(2 ** 64 - 1), "--n", "2"], "--seed must be an integer >= 0 and <= 18446744073709551614"),
    (["-o", "."], "-o/--output '.' is a folder; give a file name ending in .png"),
    (["-o", "out.jpg"], "images are written as PNG (with the settings in its text chunks); give a name ending in .png"),
    (["-o", "/dev/null/x.png"], "-o/--output '/dev/null/x.png': folder '/dev/null' does not exist"),
    (["-o", "no/such/../folder/x.png"], "does not exist (create it first)"),
    (["--lora", "adapter.safetensors:nan"], "--lora 'adapter.safetensors:nan': its scale must be a finite number, got 'nan'"),
    (["--lora", "adapter.safetensors:-inf"], "its scale must be a finite number, got '-inf'"),
    (["--lora", "adapter.bin"], "--lora 'adapter.bin'"),
    (["--strength", "0.5"], "--strength needs --image (the picture to edit)"),
    (["--mask", "m.png"], "--mask needs --image (the picture to edit)"),
    (["--image", "no_such_image.png"], "--image: no such file 'no_such_image.png'"),
    (["--strength", "nan", "--image", "x.png"], "--strength must be a finite number >= 0 <= 1, got nan"),
    (["--negative-prompt", "x" * 20000], "--negative-prompt must be at most 10000 characters, got 20000"),
    (["--width", "33"], "width must be a positive multiple of 4 and at most 8192 for this model, got 33"),
    (["--eta", "-1"], "--eta must be a finite number >= 0, got -1"),
    (["--guidance-rescale", "2"], "--guidance-rescale must be a finite number >= 0 <= 1, got 2"),
    (["--model", "/dev/null"], "--model '/dev/null' is a file"),
    (["--model", "/etc"], "--model '/etc' is missing ['model_index.json'"),
    (["--model", "../../../../../../no/such/model"], "does not exist (give a diffusers folder or a Hub id)"),
]


@pytest.mark.parametrize("flags, message", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_bad_flags(sd_folder, tmp_path, capsys, flags, message):
    assert generate(*flags, model=sd_folder, tmp_path=tmp_path) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # before it, at most diffusers' loading bar
    assert last.startswith("latent-diffusion generate: error: ") and message in last and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("kind, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_generate_bad_model(sd_folder, tmp_path, capsys, no_unpickling, kind, message):
    assert generate(model=broken_model(kind, sd_folder, tmp_path), tmp_path=tmp_path) == 2
    assert "--model" in capsys.readouterr().err


def test_generate_output_in_a_missing_folder(sd_folder, tmp_path, capsys):
    assert generate(model=sd_folder, output=tmp_path / "nowhere" / "x.png") == 2
    err = capsys.readouterr().err
    assert "-o/--output" in err and "does not exist (create it first)" in err


EVAL_CASES = [
    (["--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number >= 0, got inf"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
    (["--num-prompts", "0"], "--num-prompts must be an integer >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--size", "100000"], "--size must be an integer >= 1 and <= 8192, got 100000"),
    (["--samplers", "nope"], "--samplers names unknown sampler(s) ['nope']"),
    (["--guidance", "-1"], "--guidance must be a finite number >= 0, got -1"),
    (["--steps", "-5"], "--steps must be an integer >= 1, got -5"),
    (["--seeds", "-1"], "--seeds must be an integer >= 1, got -1"),
    (["--size", "0"], "--size must be an integer >= 1 and <= 8192, got 0"),
    (["--batch-size", "-2"], "--batch-size must be an integer >= 1, got -2"),
    (["--num-prompts", "-1"], "--num-prompts must be an integer >= 1, got -1"),
]


@pytest.mark.parametrize("flags, message", EVAL_CASES, ids=[" ".join(c[0]) for c in EVAL_CASES])
def test_eval_bad_flags(sd_folder, tmp_path, capsys, flags, message):
    assert cli_main(["eval", "--model", str(sd_folder), "--out", str(tmp_path / "eval"), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_bad_model(sd_folder, tmp_path, capsys, no_unpickling):
    model = broken_model("pickle_only", sd_folder, tmp_path)
    assert cli_main(["eval", "--model", model, "--out", str(tmp_path / "eval"), "--quiet"]) == 2
    assert "never unpickled" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["generate", "a red circle", "--guidance", "nan"], "--guidance must be a finite number"),
    (["generate", "a red circle", "--steps", "many"], "argument --steps: invalid int value"),
], ids=["nan", "argparse"])
def test_command_exit_status_2_without_traceback(tmp_path, flags, message):
    done = subprocess.run([sys.executable, "-m", "latent_diffusion.apps.cli", *flags, "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- the pipeline call


@pytest.fixture(scope="module")
def pipe(sd_folder):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


PIPELINE_CASES = [
    ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1, got 0"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer >= 1, got 2.5"),
    ({"guidance_scale": math.nan}, "guidance_scale must be a finite number >= 0, got nan"),
    ({"guidance_scale": math.inf}, "guidance_scale must be a finite number >= 0, got inf"),
    ({"guidance_rescale": math.nan}, "guidance_rescale must be a finite number >= 0 <= 1, got nan"),
    ({"eta": -math.inf}, "eta must be a finite number >= 0, got -inf"),
    ({"sampler": "nope"}, "sampler must be one of"),
    ({"output_type": "jpeg"}, "output_type must be one of"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be an integer >= 1, got 0"),
    ({"height": 30}, "height must be a positive multiple of 4 and at most 8192 for this model, got 30"),
    ({"width": 16384}, "width must be a positive multiple of 4 and at most 8192 for this model, got 16384"),
    ({"prompt_syntax": "comfy"}, "prompt_syntax must be one of 'a1111', 'plain', got 'comfy'"),
    ({"num_inference_steps": -1}, "num_inference_steps must be an integer >= 1, got -1"),
    ({"guidance_scale": -0.5}, "guidance_scale must be a finite number >= 0, got -0.5"),
    ({"guidance_rescale": 2}, "guidance_rescale must be a finite number >= 0 <= 1, got 2"),
    ({"eta": math.nan}, "eta must be a finite number >= 0, got nan"),
    ({"sampler": ""}, "sampler must be one of"),
    ({"num_images_per_prompt": 1.5}, "num_images_per_prompt must be an integer >= 1, got 1.5"),
    ({"num_images_per_prompt": 100000}, "num_images_per_prompt asks for 100000 images in one call; at most 256"),
    ({"negative_prompt": "x" * 20000}, "negative_prompt must be at most 10000 characters, got 20000"),
    ({"width": 31}, "width must be a positive multiple of 4 and at most 8192 for this model, got 31"),
    ({"height": -32}, "height must be a positive multiple of 4 and at most 8192 for this model, got -32"),
]


@pytest.mark.parametrize("kwargs, message", PIPELINE_CASES, ids=[next(iter(c[0])) + "=" + str(next(iter(c[0].values())))
                                                                 for c in PIPELINE_CASES])
def test_pipeline_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError) as error:
        pipe("a red circle", num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)
    assert message in str(error.value)


def test_nan_latents_stop_sampling_with_a_clear_error(pipe):
    poison = lambda pipe, i, t, state: {"latents": state["latents"] * math.nan} if i == 0 else None  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"latents became non-finite \(NaN\); .*float32"):
        pipe("a red circle", num_inference_steps=3, callback_on_step_end=poison)


# ----------------------------------------------------------------------------- the fp16 VAE decode


def test_fp16_vae_overflow_decodes_again_in_fp32():
    """Huge latents overflow a float16 VAE (inf/NaN, the black-image failure); decode_latents redoes it in float32."""
    from latent_diffusion.vae import decode_latents
    from latent_diffusion.tiny import tiny_components

    vae = tiny_components()["vae"].half()
    latents = torch.full((1, 4, 8, 8), 3e4)  # (B, C, h, w): / scaling_factor is past float16's 65504
    scale = vae.config.scaling_factor
    with torch.no_grad():
        assert not torch.isfinite(vae.decode(latents.half() / scale).sample).all()  # the failure being guarded
        with pytest.warns(UserWarning, match="decoding again in float32"):
            pixels = decode_latents(vae, latents)
        assert vae.dtype == torch.float16  # restored after the fallback
        reference = vae.float().decode(latents / scale).sample
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    torch.testing.assert_close(pixels, reference)


# ----------------------------------------------------------------------------- the training script


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_imagefolder(tmp_path_factory.mktemp("data") / "images", 4))


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory):
    return str(make_imagefolder(tmp_path_factory.mktemp("corrupt") / "images", 3, broken=(0, 1, 2)))


def train_cli(model, data, out, *flags):
    """The training script's command entry in-process: its exit status (argparse's SystemExit included)."""
    from accelerate.state import AcceleratorState, GradientState

    from latent_diffusion.training.train_text2img import cli

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "1", "--report_to", "none",
            *map(str, flags)]
    try:
        return cli(argv)
    except SystemExit as stop:
        return stop.code


TRAIN_FLAG_CASES = [
    (["--resolution", "0"], "--resolution must be >= 1, got 0"),
    (["--resolution", "100000"], "--resolution must be at most 8192, got 100000"),
    (["--train_batch_size", "0"], "--train_batch_size must be >= 1, got 0"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number >= 0, got nan"),
    (["--learning_rate", "inf"], "--learning_rate must be a finite number >= 0, got inf"),
    (["--snr_gamma", "nan"], "--snr_gamma must be a finite number >= 0, got nan"),
    (["--noise_offset", "inf"], "--noise_offset must be a finite number >= 0, got inf"),
    (["--ema_decay", "nan"], "--ema_decay must be a finite number >= 0 <= 1, got nan"),
    (["--adam_beta2", "nan"], "--adam_beta2 must be a finite number >= 0 <= 1, got nan"),
    (["--max_grad_norm", "inf"], "--max_grad_norm must be a finite number >= 0, got inf"),
    (["--caption_dropout", "nan"], "--caption_dropout must be a finite number >= 0 <= 1, got nan"),
    (["--validation_guidance_scale", "nan"], "--validation_guidance_scale must be a finite number >= 0, got nan"),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint '/no/such/checkpoint' does not exist"),
    (["--train_batch_size", "-1"], "--train_batch_size must be >= 1, got -1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
    (["--checkpointing_steps", "0"], "--checkpointing_steps must be >= 1, got 0"),
    (["--max_train_steps", "0"], "--max_train_steps must be >= 1, got 0"),
    (["--resolution", "-5"], "--resolution must be >= 1, got -5"),
    (["--adam_beta1", "nan"], "--adam_beta1 must be a finite number >= 0 <= 1, got nan"),
    (["--ema_decay", "2"], "--ema_decay must be a finite number >= 0 <= 1, got 2"),
    (["--caption_dropout", "1.5"], "--caption_dropout must be a finite number >= 0 <= 1, got 1.5"),
    (["--learning_rate=-inf"], "--learning_rate must be a finite number >= 0, got -inf"),
    (["--resume_from_checkpoint", "/etc"], "--resume_from_checkpoint '/etc' is not a complete checkpoint folder"),
    (["--resume_from_checkpoint", "../../../../no/such"], "--resume_from_checkpoint '../../../../no/such' does not exist"),
]


@pytest.mark.parametrize("flags, message", TRAIN_FLAG_CASES, ids=[" ".join(c[0]) for c in TRAIN_FLAG_CASES])
def test_training_bad_flags(sd_folder, data_dir, tmp_path, capsys, flags, message):
    assert train_cli(sd_folder, data_dir, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_training_missing_caption_column(sd_folder, data_dir, tmp_path, capsys):
    assert train_cli(sd_folder, data_dir, tmp_path / "out", "--caption_column", "caption") == 2
    assert "--caption_column 'caption' is not a column of the dataset; its columns are" in capsys.readouterr().err


def test_training_all_images_corrupt(sd_folder, corrupt_dir, tmp_path, capsys):
    assert train_cli(sd_folder, corrupt_dir, tmp_path / "out", "--no_cache") == 2
    assert "none of its 3 image(s) could be read" in capsys.readouterr().err


def test_training_pickle_only_model(sd_folder, data_dir, tmp_path, capsys, no_unpickling):
    model = broken_model("pickle_only", sd_folder, tmp_path)
    assert train_cli(model, data_dir, tmp_path / "out") == 2
    assert "--pretrained_model_name_or_path" in capsys.readouterr().err


@pytest.mark.slow
def test_training_script_exit_status_2_without_traceback(sd_folder, data_dir, tmp_path):
    """As a user runs it: a data error after the model loaded is one line and status 2."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--pretrained_model_name_or_path", str(sd_folder),
                           "--train_data_dir", data_dir, "--output_dir", str(tmp_path / "out"), "--resolution", "32",
                           "--report_to", "none", "--caption_column", "caption"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "error: --caption_column 'caption' is not a column" in done.stderr and "Traceback" not in done.stderr


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(sd_folder, data_dir, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from latent_diffusion.training import train_text2img

    calls, real_loss = [], train_text2img.denoising_loss

    def loss_going_nan(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * math.nan if len(calls) >= 3 else loss  # steps 1, 2 fine; step 3 diverges

    monkeypatch.setattr(train_text2img, "denoising_loss", loss_going_nan)
    out = tmp_path / "out"
    assert train_cli(sd_folder, data_dir, out, "--max_train_steps", "4", "--checkpointing_steps", "1", "--use_ema") == 1
    assert "the training loss became nan at step 3" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-2" / name)).values())
    assert not (out / "model_index.json").exists()  # no final pipeline from a diverged run
