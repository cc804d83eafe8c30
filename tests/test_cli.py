"""The `latent-diffusion generate` command: files, metadata, seeds, errors."""
import json

import numpy as np
from PIL import Image

from latent_diffusion.apps.cli import main


def run_generate(folder, out, *extra):
    return main(["generate", "a red circle above a blue square", "-o", str(out), "--model", str(folder),
                 "--steps", "3", "--quiet", *extra])


def test_generate_writes_png_with_metadata(sd_folder, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert run_generate(sd_folder, out, "--seed", "7", "--sampler", "ddim", "--guidance", "4") == 0
    assert str(out) in capsys.readouterr().out
    image = Image.open(out)
    assert image.size == (32, 32)
    meta = image.text
    assert meta["prompt"] == "a red circle above a blue square"
    assert (meta["seed"], meta["sampler"], meta["steps"], meta["guidance"]) == ("7", "ddim", "3", "4.0")
    assert (meta["height"], meta["width"]) == ("32", "32")
    assert meta["model"] == str(sd_folder) and meta["negative_prompt"] == ""
    assert {"torch", "diffusers", "transformers", "latent_diffusion"} <= set(json.loads(meta["versions"]))


def test_image_k_of_a_batch_reproduces_with_seed_plus_k(sd_folder, tmp_path):
    assert run_generate(sd_folder, tmp_path / "batch.png", "--seed", "10", "--n", "2") == 0
    assert run_generate(sd_folder, tmp_path / "single.png", "--seed", "11") == 0
    second = np.asarray(Image.open(tmp_path / "batch-1.png"))
    assert Image.open(tmp_path / "batch-1.png").text["seed"] == "11"
    single = np.asarray(Image.open(tmp_path / "single.png"))
    # the same noise and sampler; CPU kernels may round a batch of 2 and a batch of 1 apart in the last bit
    assert np.abs(second.astype(int) - single.astype(int)).max() <= 1


def test_bad_size_is_a_clear_error(sd_folder, tmp_path, capsys):
    assert run_generate(sd_folder, tmp_path / "x.png", "--height", "30") == 2
    assert "height" in capsys.readouterr().err


def test_shapes_export_writes_an_imagefolder(tmp_path):
    import datasets

    out = tmp_path / "shapes"
    assert main(["shapes-export", str(out), "--n", "6", "--size", "32", "--seed", "3"]) == 0
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 6 and ds[0]["image"].size == (32, 32) and ds[0]["text"].startswith("a")
    assert main(["shapes-export", str(out), "--n", "2"]) == 2  # refuses to overwrite without --overwrite
    assert main(["shapes-export", str(tmp_path / "bad"), "--size", "30"]) == 2


def test_clip_skip_is_used_and_recorded(sd_folder, tmp_path, capsys):
    assert run_generate(sd_folder, tmp_path / "plain.png", "--sampler", "ddim") == 0
    assert run_generate(sd_folder, tmp_path / "skip.png", "--sampler", "ddim", "--clip-skip", "1") == 0
    skipped = Image.open(tmp_path / "skip.png")
    assert skipped.text["clip_skip"] == "1" and "clip_skip" not in Image.open(tmp_path / "plain.png").text
    plain = np.asarray(Image.open(tmp_path / "plain.png")).astype(int)
    assert np.abs(np.asarray(skipped).astype(int) - plain).max() > 2
    assert run_generate(sd_folder, tmp_path / "bad.png", "--clip-skip", "5") == 2
    assert "clip_skip must be an integer from 1 to 2" in capsys.readouterr().err
