"""training/train_controlnet.py on tiny components: a ControlNet folder diffusers loads that changes the image,
exact resume, two processes, flag errors; the Shapes export with outlines it trains on."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from conftest import run_script_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_controlnet.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """8 Shapes scenes at 32 px with their outline control images (an imagefolder)."""
    from latent_diffusion.shapes.dataset import export_imagefolder

    return str(export_imagefolder(tmp_path_factory.mktemp("shapes") / "data", 8, size=32, outline=True))


def flags(sd_folder, data_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", data_dir,
            "--output_dir", str(output_dir), "--resolution", "32", "--train_batch_size", "2",
            "--learning_rate", "5e-2", "--report_to", "none", "--seed", "3", *[str(f) for f in extra]]


def train(sd_folder, data_dir, output_dir, *extra):
    """The script's main() in this process (a fresh accelerate state each time)."""
    from latent_diffusion.training.train_controlnet import main

    run_script_main(main, flags(sd_folder, data_dir, output_dir, *extra))


def generate(pipe, control_image=None) -> np.ndarray:
    extra = {} if control_image is None else {"control_image": control_image}
    image = pipe("a red circle", num_inference_steps=4, guidance_scale=3.0, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0), **extra).images[0]
    return np.asarray(image)


def test_export_with_outlines_loads_as_a_conditioning_column(data_dir):
    """export_imagefolder(outline=True): imagefolder gives a conditioning_image column, the scene's outline."""
    import datasets

    from latent_diffusion.shapes.dataset import shapes_example

    loaded = datasets.load_dataset("imagefolder", data_dir=data_dir)["train"]
    assert set(loaded.column_names) == {"image", "text", "conditioning_image"} and len(loaded) == 8
    example = shapes_example(5, size=32, outline=True)
    assert loaded[5]["text"] == example["text"]
    assert np.array_equal(np.asarray(loaded[5]["conditioning_image"]), np.asarray(example["conditioning_image"]))


def test_two_steps_give_a_controlnet_folder_that_changes_the_image(sd_folder, data_dir, tmp_path):
    """2 steps → OUT is a ControlNet folder diffusers' ControlNetModel loads (safetensors), from_unet-shaped,
    a validation grid and card; the pipeline's image with it differs from the image without it."""
    from diffusers import ControlNetModel

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    out = tmp_path / "out"
    outline = str(Path(data_dir) / "conditioning" / "000000.png")
    train(sd_folder, data_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--validation_prompts",
          "a red circle", "--validation_image", outline, "--validation_steps", 2, "--num_validation_inference_steps", 2)
    assert (out / "diffusion_pytorch_model.safetensors").is_file() and not list(out.glob("*.bin"))
    net = ControlNetModel.from_pretrained(str(out))
    assert tuple(net.config.conditioning_embedding_out_channels) == (16, 32)  # the tiny VAE's factor 2
    assert (out / "validation" / "step-000002.png").is_file() and "ControlNet" in (out / "README.md").read_text()
    from PIL import Image

    control = Image.open(outline).convert("RGB")
    plain = LatentDiffusionPipeline.from_pretrained(str(sd_folder))
    controlled = LatentDiffusionPipeline.from_pretrained(str(sd_folder), controlnet=str(out))
    assert np.abs(generate(controlled, control) - generate(plain)).max() > 2 / 255


def test_sdxl_two_steps_give_a_controlnet_for_the_sdxl_model(sdxl_folder, data_dir, tmp_path):
    """On a tiny SDXL model: 2 steps (with a validation grid) → an SDXL ControlNet folder (text_time added
    embeddings, trained off zero) that diffusers' SDXL ControlNet pipeline and ours load, and that changes the image."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from PIL import Image

    from latent_diffusion.pipelines import LatentDiffusionPipeline

    out = tmp_path / "out"
    outline = str(Path(data_dir) / "conditioning" / "000000.png")
    train(sdxl_folder, data_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--validation_prompts",
          "a red circle", "--validation_image", outline, "--validation_steps", 2, "--num_validation_inference_steps", 2)
    net = ControlNetModel.from_pretrained(str(out))
    assert net.config.addition_embed_type == "text_time" and net.controlnet_mid_block.weight.abs().max() > 0
    assert (out / "validation" / "step-000002.png").is_file()
    control = Image.open(outline).convert("RGB")
    plain = LatentDiffusionPipeline.from_pretrained(str(sdxl_folder))
    controlled = LatentDiffusionPipeline.from_pretrained(str(sdxl_folder), controlnet=str(out))
    assert np.abs(generate(controlled, control) - generate(plain)).max() > 2 / 255
    theirs = StableDiffusionXLControlNetPipeline.from_pretrained(str(sdxl_folder), controlnet=net)
    theirs.set_progress_bar_config(disable=True)
    image = theirs("a red circle", image=control, num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_base_model_stays_frozen(sd_folder, data_dir, tmp_path):
    """Training moves the ControlNet's zero convolutions off zero and leaves the UNet as it was."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    train(sd_folder, data_dir, tmp_path / "out", "--max_train_steps", 2, "--checkpointing_steps", 2)
    net = ControlNetModel.from_pretrained(str(tmp_path / "out"))
    assert net.controlnet_mid_block.weight.abs().max() > 0  # from_unet starts it at zero
    base = UNet2DConditionModel.from_pretrained(str(sd_folder), subfolder="unet")
    fresh = ControlNetModel.from_unet(base, conditioning_embedding_out_channels=(16, 32))
    assert not torch.equal(net.conv_in.weight, fresh.conv_in.weight)
    files = os.listdir(tmp_path / "out")
    assert "unet" not in files and "model_index.json" not in files  # the output is the ControlNet alone


def test_resume_is_exact(sd_folder, data_dir, tmp_path):
    """4 steps straight == 2, stop, 2 more (weights, optimizer, EMA and data position come back)."""
    extra = ["--checkpointing_steps", 2, "--use_ema", "--ema_decay", 0.9]
    train(sd_folder, data_dir, tmp_path / "straight", "--max_train_steps", 4, *extra)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 2, *extra)
    train(sd_folder, data_dir, tmp_path / "split", "--max_train_steps", 4, "--resume_from_checkpoint", "latest", *extra)
    for name in ("checkpoint-4/model.safetensors", "checkpoint-4/ema.safetensors",
                 "diffusion_pytorch_model.safetensors"):
        straight, split = load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name))
        assert straight.keys() == split.keys() and straight
        for key in straight:
            assert torch.equal(straight[key], split[key]), (name, key)


@pytest.mark.parametrize("extra, message", [
    (["--lora_rank", "4"], "--lora_rank is not supported by train_controlnet.py"),
    (["--train_text_encoder"], "--train_text_encoder is not supported by train_controlnet.py"),
    (["--random_flip"], "--random_flip is not supported"),
    (["--validation_prompts", "a cat"], "--validation_prompts needs --validation_image"),
    (["--controlnet_model_name_or_path", "/nonexistent"], "--controlnet_model_name_or_path '/nonexistent'"),
    (["--conditioning_image_column", "depth"], "--conditioning_image_column 'depth'"),
])
def test_bad_flags_are_one_line(sd_folder, data_dir, tmp_path, capsys, extra, message):
    """A bad flag or a missing column: exit status 2 and one line naming it."""
    from accelerate.state import AcceleratorState, GradientState

    from latent_diffusion.training.train_controlnet import cli

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        status = cli(flags(sd_folder, data_dir, tmp_path / "out", "--max_train_steps", 1, *extra))
    except SystemExit as exit_:  # argparse's error for a flag
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.slow
def test_two_processes(sd_folder, data_dir, tmp_path):
    """accelerate launch --multi_gpu, two CPU processes over gloo: world size 2, distinct ranks, the same weights,
    one ControlNet folder."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(SCRIPT), *flags(sd_folder, data_dir, tmp_path / "out", "--train_batch_size", 1,
                                             "--max_train_steps", 2, "--checkpointing_steps", 2,
                                             "--sample_index_log", tmp_path / "rows")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [(tmp_path / f"rows.rank{r}").read_text().splitlines() for r in range(2)]  # one log per rank: 2 ranks
    assert not (tmp_path / "rows.rank2").exists()
    steps = [[line.split() for line in log if not line.startswith("weights")] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 2
    for a, b in zip(*steps):
        assert a[0] == b[0] and not set(a[1:]) & set(b[1:])  # same step, disjoint rows: distinct ranks
    assert logs[0][-1].startswith("weights") and logs[0][-1] == logs[1][-1]
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()
