"""The embedded 20-step model: it ships, loads offline by name, follows prompts, and evaluates.

These tests use the real shipped folder `latent_diffusion/default_model/` (fp16, a few MB), so they
check what a user installing the package gets. With no model named, generation loads
`assets.GENERATION_DEFAULT` (this model until its few-step distillation holds the targets;
tests/test_default_lcm.py); training starts from this one.
"""
import json

import pytest
from PIL import Image
from safetensors import safe_open

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.formats import assets
from latent_diffusion.apps.cli import main
from latent_diffusion.diffusion.samplers import SAMPLER_NAMES
from latent_diffusion.shapes import score_images

FOLDER = assets.DEFAULT_MODEL_DIR
MAX_BYTES = 15 * 1024 * 1024
# Held-in prompts of each category; the default must get most of them right at its own settings.
PROMPTS = [
    "a red circle",
    "a blue square on a white background",
    "a large yellow triangle",
    "a small green circle at the top",
    "a purple square on the left",
    "an orange triangle at the bottom on a black background",
    "a red circle above a blue square",
    "a green triangle to the left of a yellow circle",
    "a blue square below a red triangle on a gray background",
    "a yellow circle to the right of a purple square",
]


@pytest.fixture(scope="module")
def pipe():
    pipe = LatentDiffusionPipeline.from_pretrained("default-20-step")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_folder_ships_fp16_safetensors_within_15_mb():
    weights = sorted(FOLDER.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert not list(FOLDER.rglob("*.bin")) and not list(FOLDER.rglob("*.pt*"))
    assert sum(p.stat().st_size for p in weights) <= MAX_BYTES
    for path in weights:
        with safe_open(str(path), "pt") as f:
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert dtypes <= {"F16", "I64"}, (path, dtypes)


def test_model_card_generation_defaults_and_grid():
    card = (FOLDER / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "sample_grid.png" in card
    assert Image.open(FOLDER / "sample_grid.png").size[0] >= 256
    defaults = json.loads((FOLDER / "generation_config.json").read_text())
    assert defaults["sampler"] in SAMPLER_NAMES
    assert 1 <= defaults["num_inference_steps"] <= 50 and defaults["guidance_scale"] >= 1
    metrics = json.loads((FOLDER / "recipe_metrics.json").read_text())
    assert set(metrics["adherence"]) >= {"overall", "single", "position", "two_objects", "background", "held_out"}


def test_loads_offline_by_name(pipe):
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    assert pipe.generation_defaults == json.loads((FOLDER / "generation_config.json").read_text())


def test_follows_held_in_prompts_at_its_defaults(pipe):
    """Far above chance (an untrained UNet scores 0): 30 images, measured 0.87 for the shipped model (round 4, 40k
    steps; 0.73 for round 3 at 27k, 0.67 for round 2 at 18k, 0.43 for the first one, at 10k steps).

    The bar is a regression floor of the model as shipped (its 500-prompt adherence is in the model card); raise it
    with the model.
    """
    import torch

    prompts = PROMPTS * 3
    generators = [torch.Generator().manual_seed(100 * (i // len(PROMPTS)) + i % len(PROMPTS))
                  for i in range(len(prompts))]
    images = pipe(prompts, generator=generators).images
    assert images[0].size == (64, 64)
    report = score_images(images, prompts)
    assert report["overall"] >= 0.75, report["failures"]


def test_cli_generates_with_the_20_step_model(tmp_path):
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle above a blue square", "--model", "default-20-step", "-o", str(out),
                 "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64) and image.text["prompt"] == "a red circle above a blue square"
    assert (image.text["sampler"], image.text["steps"]) == ("ddim", "20")


def test_eval_report_runs_on_the_default_at_a_tiny_setting(tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "--model", "default-20-step", "--num-prompts", "4", "--settings", "dpm++:5", "ddim:5", "--guidance", "3", "--seeds", "1",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["name"] for r in results["results"]) == ["ddim-5-w3", "dpmpp-5-w3"]
    for r in results["results"]:
        assert r["images"] == 4 and r["seconds_per_image"] > 0 and 0 <= r["shapes"]["overall"] <= 1
    assert (out / "report.md").is_file() and list((out / "plots").glob("*.png"))


def test_missing_default_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "DEFAULT_MODEL_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        assets.default_model_path()
