"""Issue 31, items 4 and 7: a fine-tune keeps its base's generation defaults; `default` names the embedded model;
`accelerate launch -m latent_diffusion.training.train_text2img` works from any folder."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from latent_diffusion.formats.assets import default_model_path
from latent_diffusion.training.generation_defaults import (output_generation_defaults, parse_generation_overrides,
                                                           resolve_model_name)
from test_data import make_imagefolder
from test_training import train

BASE_DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 4.0, "sampler": "ddim"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(make_imagefolder(tmp_path_factory.mktemp("data") / "images", 4, captions=["a red circle"]))


@pytest.fixture(scope="module")
def base_with_defaults(sd_folder, tmp_path_factory):
    folder = shutil.copytree(sd_folder, tmp_path_factory.mktemp("base") / "model")
    (folder / "generation_config.json").write_text(json.dumps(BASE_DEFAULTS))
    return folder


def test_fine_tune_keeps_the_base_generation_defaults(base_with_defaults, data_dir, tmp_path):
    train(base_with_defaults, data_dir, tmp_path / "out", "--max_train_steps", 1, "--checkpointing_steps", 5)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == BASE_DEFAULTS


def test_generation_defaults_flag_overrides_one_key(base_with_defaults, data_dir, tmp_path):
    train(base_with_defaults, data_dir, tmp_path / "out", "--max_train_steps", 1, "--checkpointing_steps", 5,
          "--generation_defaults", "sampler=euler", "guidance_scale=3")
    written = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert written == {**BASE_DEFAULTS, "sampler": "euler", "guidance_scale": 3.0}


def test_output_defaults_of_a_base_without_a_generation_config_are_the_fallbacks(sd_folder):
    from latent_diffusion.settings import FALLBACK_DEFAULTS

    assert output_generation_defaults(str(sd_folder), None) == FALLBACK_DEFAULTS
    assert output_generation_defaults(str(default_model_path()), None) == json.loads(
        (default_model_path() / "generation_config.json").read_text())


@pytest.mark.parametrize("items, message", [
    (["steps=3"], "KEY one of"), (["sampler"], "KEY=VALUE"), (["sampler=plms"], "sampler must be one of"),
    (["num_inference_steps=two"], "must be a int"), (["guidance_scale=0"], "must be > 0"),
])
def test_bad_generation_defaults_name_the_flag(items, message):
    with pytest.raises(ValueError, match="--generation_defaults") as error:
        parse_generation_overrides(items)
    assert message in str(error.value)


def test_bad_generation_defaults_are_argparse_errors(data_dir, capsys):
    from latent_diffusion.training.args import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--pretrained_model_name_or_path", "default", "--train_data_dir", data_dir,
                    "--generation_defaults", "sampler=plms"])
    assert "--generation_defaults sampler must be one of" in capsys.readouterr().err


def test_default_names_the_embedded_model(data_dir):
    from latent_diffusion.training.args import parse_args

    assert resolve_model_name("default") == str(default_model_path())
    assert resolve_model_name("some/hub-id") == "some/hub-id"
    args = parse_args(["--pretrained_model_name_or_path", "default", "--train_data_dir", data_dir])
    assert args.pretrained_model_name_or_path == str(default_model_path())


@pytest.mark.slow
def test_accelerate_launch_module_from_another_folder(data_dir, tmp_path):
    """From a folder outside the checkout, with the embedded default as the base (one LoRA step, 64 px)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
               "-m", "latent_diffusion.training.train_text2img", "--pretrained_model_name_or_path", "default",
               "--train_data_dir", data_dir, "--output_dir", "out", "--resolution", "64", "--train_batch_size", "2",
               "--max_train_steps", "1", "--lora_rank", "2", "--report_to", "none"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
