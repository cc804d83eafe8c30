"""DreamBooth and kohya folders (training/folders.py, training/dreambooth.py): rows, repeats, balance, class images
generated once and resumably, the prior-weighted loss, bad inputs, and 2-step / 2-process runs."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.training.dreambooth import generate_class_images, missing_class_images
from latent_diffusion.training.folders import folder_dataset, kohya_rows
from latent_diffusion.training.settings import DreamBoothSettings
from test_training import ROOT, SCRIPT


def run(sd_folder, output_dir, *flags):
    """The training script's main() in-process on tiny defaults, with the data given by `flags`."""
    from accelerate.state import AcceleratorState, GradientState

    from latent_diffusion.training.train_text2img import main

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    main(["--pretrained_model_name_or_path", str(sd_folder), "--output_dir", str(output_dir), "--resolution", "32",
          "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "3", *flags])


def write_images(folder, n, captions=None, size=(40, 36), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(captions[i % len(captions)])
    return folder


def db_settings(**changes):
    values = dict(caption_extension=".txt", instance_data_dir=None, instance_prompt=None, class_data_dir=None,
                  class_prompt=None, reg_data_dir=None, with_prior_preservation=False, prior_loss_weight=1.0,
                  num_class_images=4, sample_batch_size=2)
    return DreamBoothSettings(**{**values, **changes})


def test_kohya_tree_repeats_folders_and_reads_sidecars(tmp_path):
    write_images(tmp_path / "root", 1, captions=["top, tag"])
    write_images(tmp_path / "root" / "3_sks dog", 2, seed=1)
    (tmp_path / "root" / "3_sks dog" / "001.txt").write_text("sks dog, sitting\n")
    (tmp_path / "root" / "notes").mkdir()  # no N_ prefix: not a training folder
    rows = kohya_rows(str(tmp_path / "root"), ".txt", "--train_data_dir")
    assert [r.caption for r in rows] == ["top, tag"] + ["sks dog", "sks dog, sitting"] * 3


def test_empty_repeat_folder_is_a_one_line_error(tmp_path):
    write_images(tmp_path / "root" / "10_sks dog", 1)
    (tmp_path / "root" / "10_x").mkdir()
    with pytest.raises(ValueError, match=r"^--train_data_dir: folder '10_x' has no images \(.png"):
        kohya_rows(str(tmp_path / "root"), ".txt", "--train_data_dir")


def test_image_without_caption_is_named(tmp_path):
    write_images(tmp_path / "root", 1)
    with pytest.raises(ValueError, match=r"--train_data_dir: image .*000.png' has no caption file .*000.txt'"):
        kohya_rows(str(tmp_path / "root"), ".txt", "--train_data_dir")


def test_prior_rows_are_balanced_and_weighted(tmp_path):
    write_images(tmp_path / "inst", 3)
    write_images(tmp_path / "cls", 2, seed=2)
    write_images(tmp_path / "reg" / "1_a dog", 1, seed=3)
    db = db_settings(instance_data_dir=str(tmp_path / "inst"), instance_prompt="a sks dog",
                     class_data_dir=str(tmp_path / "cls"), class_prompt="a dog", reg_data_dir=str(tmp_path / "reg"),
                     with_prior_preservation=True, prior_loss_weight=0.5)
    dataset, weights = folder_dataset(db, None, "image", "text")
    assert dataset["text"] == ["a sks dog"] * 3 + ["a dog"] * 3  # 3 class rows of the 3 found, to match 3 instances
    assert weights.tolist() == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    again, _ = folder_dataset(db, None, "image", "text")
    assert again._fingerprint == dataset._fingerprint  # the cache key stays put across runs


class FakePipe:
    """Stands in for the base model: counts prompts, fails after `fail_after` batches (a killed generation)."""

    def __init__(self, fail_after=None):
        self.unet, self.prompts, self.fail_after, self.batches = torch.nn.Linear(1, 1), [], fail_after, 0

    def __call__(self, prompts, height, width, generator):
        if self.fail_after is not None and self.batches == self.fail_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.prompts += prompts
        seeds = [g.initial_seed() % 255 for g in generator]
        return type("Out", (), {"images": [Image.new("RGB", (width, height), (s, 0, 0)) for s in seeds]})


def test_class_images_are_generated_once_and_resume(tmp_path):
    db = db_settings(class_data_dir=str(tmp_path / "cls"), class_prompt="a dog", with_prior_preservation=True,
                     num_class_images=5, sample_batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(db, lambda: FakePipe(fail_after=1), seed=0, resolution=8)
    assert sorted(os.listdir(tmp_path / "cls")) == ["class-00000.png", "class-00001.png"]  # no partial files
    first = np.asarray(Image.open(tmp_path / "cls" / "class-00001.png"))
    pipe = FakePipe()
    assert generate_class_images(db, lambda: pipe, seed=0, resolution=8) == 3
    assert pipe.prompts == ["a dog"] * 3 and missing_class_images(db.class_data_dir, 5) == []
    assert generate_class_images(db, lambda: FakePipe(fail_after=0), seed=0, resolution=8) == 0  # nothing to do
    fresh = tmp_path / "fresh"
    generate_class_images(db_settings(class_data_dir=str(fresh), class_prompt="a dog", with_prior_preservation=True,
                                      num_class_images=2), FakePipe, seed=0, resolution=8)
    assert np.array_equal(np.asarray(Image.open(fresh / "class-00001.png")), first)  # image i from seed (seed, i)


def test_weighted_loss_is_the_mean_of_weighted_samples():
    from latent_diffusion.diffusion.losses import DenoisingLoss
    from latent_diffusion.diffusion.schedules import NoiseSchedule
    from latent_diffusion.text.conditioners import Conditioning
    from latent_diffusion.tiny import tiny_components
    from latent_diffusion.training.train_text2img import denoising_loss

    parts = tiny_components()
    loss_fn = DenoisingLoss(NoiseSchedule.from_config(parts["scheduler"].config))
    z0, cond = torch.randn(2, 4, 8, 8), Conditioning(context=torch.randn(2, 77, 32))
    per_sample = loss_fn(lambda z, t, c: parts["unet"](z, t, encoder_hidden_states=c.context).sample, z0, cond,
                         torch.Generator().manual_seed(0), reduce=False)
    weighted = denoising_loss(parts["unet"], z0, cond, loss_fn, torch.Generator().manual_seed(0), torch.tensor([1., .25]))
    assert torch.allclose(weighted, (per_sample[0] + 0.25 * per_sample[1]) / 2)


def test_two_steps_with_prior_preservation_generates_class_images(sd_folder, tmp_path, monkeypatch):
    from latent_diffusion.training import train_text2img

    weights, real = [], train_text2img.denoising_loss

    def spy(*args):
        weights.append(args[5].tolist())
        return real(*args)

    monkeypatch.setattr(train_text2img, "denoising_loss", spy)
    inst = write_images(tmp_path / "inst", 2)
    argv = ["--instance_data_dir", str(inst), "--instance_prompt", "a sks shape", "--with_prior_preservation",
            "--class_data_dir", str(tmp_path / "cls"), "--class_prompt", "a shape", "--num_class_images", "3",
            "--prior_loss_weight", "0.5", "--max_train_steps", "2", "--train_batch_size", "4"]
    run(sd_folder, tmp_path / "out", *argv)
    assert sorted(os.listdir(tmp_path / "cls")) == [f"class-{i:05d}.png" for i in range(3)]
    assert Image.open(tmp_path / "cls" / "class-00000.png").size == (32, 32)
    assert [sorted(w) for w in weights] == [[0.5, 0.5, 1.0, 1.0]] * 2  # 2 instance + 2 (balanced) class rows
    assert (tmp_path / "out" / "model_index.json").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--prior_loss_weight", "0.5"], "--prior_loss_weight needs --with_prior_preservation"),
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_data_dir"),
    (["--instance_prompt", "x"], "--instance_prompt needs --instance_data_dir"),
    (["--keep_tokens", "-1"], "--keep_tokens must be >= 0"),
    (["--caption_tag_dropout_rate", "1.5"], "--caption_tag_dropout_rate must be in [0, 1)"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    from latent_diffusion.training.args import parse_args

    base = ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(base + flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_with_prior_preservation_and_shuffled_captions(sd_folder, tmp_path):
    """accelerate launch, 2 CPU processes, prior preservation + shuffled captions with kept tokens: the class images
    are generated once (by the main process; the other rank waits and finds them), world size 2 (one row log per
    rank, no third), distinct rows on distinct ranks, the same final weights, and the output folder generates."""
    write_images(tmp_path / "data" / "2_sks shape", 2, captions=["sks, red, circle, small"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(SCRIPT), "--pretrained_model_name_or_path", str(sd_folder),
               "--train_data_dir", str(tmp_path / "data"), "--with_prior_preservation",
               "--class_data_dir", str(tmp_path / "cls"), "--class_prompt", "a shape", "--num_class_images", "2",
               "--shuffle_caption", "--keep_tokens", "1", "--output_dir", str(tmp_path / "out"), "--resolution", "32",
               "--train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none",
               "--sample_index_log", str(tmp_path / "rows")]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "cls")) == ["class-00000.png", "class-00001.png"]
    output = done.stdout + done.stderr
    assert output.count("generating 2 class images of 'a shape'") == 1, output[-3000:]  # once, not per rank
    assert output.count("generated 2 class images") == 1
    logs = [(tmp_path / f"rows.rank{r}").read_text().splitlines() for r in range(2)]  # one file per rank: 2 ranks
    assert not (tmp_path / "rows.rank2").exists()  # and no third: world size 2
    steps = [[line.split() for line in log if not line.startswith("weights")] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 2
    for a, b in zip(*steps):
        assert a[0] == b[0] and not set(a[1:]) & set(b[1:])  # same step, distinct rows on distinct ranks
    assert logs[0][-1].startswith("weights") and logs[0][-1] == logs[1][-1]
    from latent_diffusion import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(tmp_path / "out"))
    image = pipe("sks, red", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def zorb_example():
    """examples/dreambooth_zorb.py, the helpers of examples/train_dreambooth.sh, as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dreambooth_zorb", ROOT / "examples" / "dreambooth_zorb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dreambooth_example_teaches_the_word_at_reduced_steps(tmp_path):
    """examples/train_dreambooth.sh's recipe, shortened: the embedded default with prior preservation learns "a zorb"
    (judged by the Shapes scorer as "a large red circle") more than it knew it untrained (same seeds)."""
    from conftest import run_script_main

    from latent_diffusion import LatentDiffusionPipeline
    from latent_diffusion.training.train_text2img import main

    zorb = zorb_example()
    folder = zorb.write_instances(str(tmp_path / "data"), n=8)
    assert folder.name == f"{zorb.REPEATS}_a zorb" and len(os.listdir(folder)) == 8
    run_script_main(main, [
        "--pretrained_model_name_or_path", "default", "--train_data_dir", str(tmp_path / "data"),
        "--with_prior_preservation", "--class_data_dir", str(tmp_path / "cls"), "--class_prompt", zorb.CLASS_PROMPT,
        "--num_class_images", "8", "--sample_batch_size", "8", "--lora_rank", "8", "--learning_rate", "1e-3",
        "--lr_warmup_steps", "0", "--resolution", "64", "--train_batch_size", "8", "--max_train_steps", "60",
        "--report_to", "none", "--seed", "0", "--output_dir", str(tmp_path / "out")])
    assert len(os.listdir(tmp_path / "cls")) == 8
    pipe = LatentDiffusionPipeline.from_pretrained("default-20-step")  # the model the LoRA was trained on
    pipe.set_progress_bar_config(disable=True)
    rates, images = zorb.measure(pipe, tmp_path / "out", range(16))
    assert rates["word_after"] > rates["word_before"] + 0.5, rates  # measured: 0.000 -> 0.875
    assert len(images["class_after"]) == 16 and zorb.grid(images).size == (8 * 64, 4 * 64)
