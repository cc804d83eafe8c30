"""Issue 31, item 9: --quiet means quiet, LoRA loads do not warn about text-encoder keys, eval's help lists every
sampler, and what the examples write into the checkout is ignored by git."""
import logging
import subprocess
from pathlib import Path

import pytest

from latent_diffusion.diffusion.samplers import SAMPLER_NAMES
from test_lora_loading import make_lora

ROOT = Path(__file__).resolve().parents[1]


def test_quiet_generate_prints_no_loading_bars(sd_folder, tmp_path, capfd):
    from latent_diffusion.apps.cli import main

    assert main(["generate", "a red circle", "-o", str(tmp_path / "a.png"), "--model", str(sd_folder),
                 "--steps", "2", "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err and "%|" not in err


def test_lora_load_does_not_warn_about_text_encoder_keys(sd_folder, tmp_path, capfd, caplog):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    lora = make_lora(sd_folder, tmp_path)  # a UNet-only LoRA: diffusers warns that CLIPTextModel has no keys
    pipe = LatentDiffusionPipeline.from_pretrained(sd_folder)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(lora, adapter_name="a")
    said = capfd.readouterr().err + caplog.text
    assert "No LoRA keys associated" not in said
    assert pipe.get_active_adapters() == ["a"]
    filters = logging.getLogger("diffusers.loaders.lora_base").filters
    assert not [f for f in filters if type(f).__name__ == "_NoMissingTextEncoderKeys"]  # only while a LoRA loads


def test_eval_help_lists_every_sampler(capsys):
    from latent_diffusion.apps.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"any of {' '.join(SAMPLER_NAMES)}" in help_text


@pytest.mark.parametrize("path", ["out.png", "tiny-run/out/unet/config.json", "lora-run/before_after.png", "cat.png"])
def test_example_outputs_are_ignored(path):
    done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 0, f"{path} is not in .gitignore"


def test_sources_are_not_ignored():
    done = subprocess.run(["git", "check-ignore", "-q", "examples/train_lora.sh"], cwd=ROOT)
    if done.returncode == 128:
        pytest.skip("not a git checkout")
    assert done.returncode == 1
