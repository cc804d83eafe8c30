"""The shipped few-step model `latent_diffusion/default_model_lcm` ("default-lcm"): its files match the recipe that
made it (training/recipes/shapes/distill.py), it loads by name here and as an LCM in diffusers, and it follows
prompts at its own defaults."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_diffusion import LatentDiffusionPipeline
from latent_diffusion.apps.cli import main
from latent_diffusion.formats import assets
from latent_diffusion.shapes import score_images
from latent_diffusion.training.recipes.shapes import distill

FOLDER = assets.LCM_MODEL_DIR
TEACHER = assets.DEFAULT_MODEL_DIR
RECORD = json.loads((FOLDER / "distill_recipe.json").read_text())
MEASURED = RECORD["measured"]


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shared_files_are_the_teachers_byte_for_byte():
    for name in distill.SHARED_FILES:
        assert files_under(FOLDER / name) == files_under(TEACHER / name), name
    index, teacher_index = (json.loads((f / "model_index.json").read_text()) for f in (FOLDER, TEACHER))
    assert index == {**teacher_index, "scheduler": ["diffusers", "LCMScheduler"]}


def test_recorded_recipe_is_the_recipe_programs():
    assert RECORD["distill_flags"] == distill.DISTILL_FLAGS and RECORD["data_images"] == distill.DATA_IMAGES
    assert (FOLDER / "README.md").read_text() == distill.model_card(
        {**MEASURED, "adherence": {int(k): v for k, v in MEASURED["adherence"].items()},
         "counts": {int(k): v for k, v in MEASURED["counts"].items()},
         "time_ratio": {int(k): v for k, v in MEASURED["time_ratio"].items()}})


def test_defaults_are_the_measured_choice():
    adherence = {int(k): v for k, v in MEASURED["adherence"].items()}
    ratio = {int(k): v for k, v in MEASURED["time_ratio"].items()}
    steps, holds = distill.choose_steps(adherence, ratio, MEASURED["teacher_adherence"])
    assert (steps, holds) == (MEASURED["steps"], MEASURED["targets_hold"])
    assert json.loads((FOLDER / "generation_config.json").read_text()) == {
        "sampler": "lcm", "num_inference_steps": steps, "guidance_scale": 1.0}
    assert MEASURED["teacher_adherence"] == json.loads((TEACHER / "recipe_metrics.json").read_text())["adherence"]["overall"]


def test_unet_is_the_teachers_architecture_with_distilled_fp16_weights():
    from safetensors.torch import load_file

    ours, theirs = (json.loads((f / "unet" / "config.json").read_text()) for f in (FOLDER, TEACHER))
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == {k: v for k, v in theirs.items() if not k.startswith("_")}
    a, b = (load_file(str(f / "unet" / "diffusion_pytorch_model.safetensors")) for f in (FOLDER, TEACHER))
    assert a.keys() == b.keys() and {t.dtype for t in a.values()} == {torch.float16}
    assert max((a[k].float() - b[k].float()).abs().max() for k in a) > 1e-2
    scheduler = json.loads((FOLDER / "scheduler" / "scheduler_config.json").read_text())
    teacher_scheduler = json.loads((TEACHER / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"
    for key in ("beta_schedule", "prediction_type", "num_train_timesteps"):
        assert scheduler[key] == teacher_scheduler[key]


@pytest.mark.parametrize("adherence, ratio, teacher, expected", [
    ({2: 0.80, 4: 0.91, 6: 0.93}, {2: 0.1, 4: 0.2, 6: 0.28}, 0.90, (4, True)),   # the fewest that hold
    ({2: 0.80, 4: 0.85, 6: 0.93}, {2: 0.1, 4: 0.2, 6: 0.35}, 0.90, (4, False)),  # 6 holds but is too slow
    ({2: 0.80, 4: 0.80}, {2: 0.4, 4: 0.5}, 0.90, (2, False)),                     # nothing fits: the fewest
])
def test_choose_steps(adherence, ratio, teacher, expected):
    assert distill.choose_steps(adherence, ratio, teacher) == expected


@pytest.fixture(scope="module")
def pipe():
    pipe = LatentDiffusionPipeline.from_pretrained("default-lcm")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_by_name_with_lcm_defaults(pipe):
    assert pipe.generation_defaults == json.loads((FOLDER / "generation_config.json").read_text())
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    teacher = LatentDiffusionPipeline.from_pretrained("default-20-step")
    assert teacher.generation_defaults["sampler"] == "ddim"


def test_follows_held_in_prompts_at_its_defaults(pipe):
    """A regression floor well under its measured adherence (distill_recipe.json), on the teacher's test prompts."""
    from test_default_model import PROMPTS

    prompts = PROMPTS * 3
    generators = [torch.Generator().manual_seed(100 * (i // len(PROMPTS)) + i % len(PROMPTS)) for i in range(len(prompts))]
    report = score_images(pipe(prompts, generator=generators).images, prompts)
    assert report["overall"] >= 0.7, report["failures"]


def test_diffusers_lcm_pipeline_gives_our_image(pipe):
    from diffusers import StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(str(FOLDER), safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=torch.float32)  # ours upcasts the fp16 files too
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == "LCMScheduler"
    steps = MEASURED["steps"]
    a = pipe("a red circle above a blue square", num_inference_steps=steps, guidance_scale=1.0, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    b = theirs("a red circle above a blue square", num_inference_steps=steps, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - b).max() <= 2 / 255


def test_generation_default_follows_the_measurement():
    """Generation loads this model when no model is named exactly when its recorded measurement holds the targets."""
    assert assets.GENERATION_DEFAULT == ("default-lcm" if MEASURED["targets_hold"] else "default-20-step")


def test_unnamed_model_is_the_generation_default(tmp_path):
    """from_pretrained() and generate (serve and eval share the path) load GENERATION_DEFAULT's folder, at its
    own generation defaults, when no model is named."""
    from PIL import Image

    folder = assets.generation_default_path()
    defaults = json.loads((folder / "generation_config.json").read_text())
    unnamed = LatentDiffusionPipeline.from_pretrained()
    assert unnamed.generation_defaults == defaults
    assert Path(unnamed.config._name_or_path).resolve() == folder.resolve()
    out = tmp_path / "unnamed.png"
    assert main(["generate", "a red circle above a blue square", "-o", str(out), "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert (image.text["sampler"], image.text["steps"]) == (defaults["sampler"], str(defaults["num_inference_steps"]))


def test_cli_generates_with_the_named_model(tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"
    assert main(["generate", "a red circle above a blue square", "--model", "default-lcm", "-o", str(out), "--quiet"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64) and image.text["sampler"] == "lcm"
    assert image.text["steps"] == str(MEASURED["steps"])


def test_missing_folder_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(assets.EMBEDDED_MODELS, "default-lcm", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="default-lcm"):
        LatentDiffusionPipeline.from_pretrained("default-lcm")
