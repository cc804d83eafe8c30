"""training/masked_loss.py: masks from alpha or a mask folder, through crop/flip/buckets, weighted in latent space;
2-step runs cached, on the fly and bucketed; a mask of another size is a one-line error."""
import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.diffusion.losses import DenoisingLoss
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.training.data import CaptionImageDataset, ImageTransform
from latent_diffusion.training.folders import rows_dataset, Row
from latent_diffusion.training.masked_loss import MaskedSamples, cached_masks, read_mask
from test_dreambooth import run


def write_rgba(folder, n=4, size=(48, 36)):
    """Images whose left third is opaque white-ish, the rest transparent, with sidecar captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
        pixels[..., 3] = 0
        pixels[:, : size[0] // 3 + i, 3] = 255
        pixels[:, : size[0] // 3 + i, 0] = 255  # red exactly where the mask is: the sample shows where it went
        pixels[:, size[0] // 3 + i:, 0] = 0
        Image.fromarray(pixels, "RGBA").save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("sks, thing")
    return folder


def test_alpha_and_mask_folder_and_size_check(tmp_path):
    data = write_rgba(tmp_path / "d", 1)
    alpha = np.asarray(read_mask({"path": str(data / "000.png"), "bytes": None}, None))
    assert alpha.shape == (36, 48) and alpha[:, 0].min() == 255 and alpha[:, -1].max() == 0
    masks = tmp_path / "m"
    masks.mkdir()
    Image.new("L", (48, 36), 128).save(masks / "000.png")
    assert np.asarray(read_mask(str(data / "000.png"), str(masks))).max() == 128
    Image.new("L", (20, 20), 128).save(masks / "000.png")
    with pytest.raises(ValueError, match=r"^--mask_dir: mask .*000.png' is 20×20 but its image .*000.png' is 48×36"):
        read_mask(str(data / "000.png"), str(masks))


@pytest.mark.parametrize("flip_seed", range(4))
def test_on_the_fly_mask_follows_the_samples_crop_and_flip(tmp_path, flip_seed):
    data = write_rgba(tmp_path / "d", 2)
    dataset = rows_dataset([Row(str(data / f"{i:03d}.png"), "x") for i in range(2)], "image", "text")
    transform = ImageTransform(32, center_crop=False, random_flip=True)
    samples = MaskedSamples(CaptionImageDataset(dataset, "image", "text", transform, seed=flip_seed), dataset,
                            "image", None, transform, seed=flip_seed)
    for index in range(2):
        item = samples[(index, 5)]
        red = (item["pixels"][0] > 0.9).float()  # where the image's red (= opaque) region landed
        assert item["loss_mask"].shape == (1, 32, 32)
        assert ((item["loss_mask"][0] > 0.5).float() - red).abs().mean() < 0.05


def test_cached_masks_are_latent_sized_and_mirrored(tmp_path):
    data = write_rgba(tmp_path / "d", 1)
    dataset = rows_dataset([Row(str(data / "000.png"), "x")], "image", "text")
    masks = cached_masks(dataset, "image", None, ImageTransform(32, True, True), [0], latent_factor=4)
    assert masks[0].shape == (2, 1, 8, 8)
    assert torch.equal(masks[0][1], masks[0][0].flip(-1)) and masks[0][0][0, :, 0].min() == 1


def test_weight_map_weighs_each_squared_error():
    from latent_diffusion.tiny import tiny_components

    loss = DenoisingLoss(NoiseSchedule.from_config(tiny_components()["scheduler"].config))
    net = lambda z, t, c: torch.zeros_like(z)  # noqa: E731
    z0 = torch.randn(2, 4, 8, 8)
    full = loss(net, z0, None, torch.Generator().manual_seed(0), reduce=False)
    ones = loss(net, z0, None, torch.Generator().manual_seed(0), reduce=False, weight_map=torch.ones(2, 1, 8, 8))
    half = torch.ones(2, 1, 8, 8)
    half[..., 4:] = 0
    left = loss(net, z0, None, torch.Generator().manual_seed(0), reduce=False, weight_map=half)
    assert torch.allclose(full, ones) and (left < full).all() and (left > 0).all()


@pytest.mark.parametrize("flags", [[], ["--no_cache"], ["--enable_bucket", "--min_bucket_reso", "32",
                                                        "--max_bucket_reso", "64", "--bucket_reso_steps", "16"]])
def test_two_steps_with_masked_loss(sd_folder, tmp_path, monkeypatch, flags):
    from latent_diffusion.training import train_text2img

    masks, real = [], train_text2img.denoising_loss

    def spy(*args):
        masks.append(args[6])
        return real(*args)

    monkeypatch.setattr(train_text2img, "denoising_loss", spy)
    data = write_rgba(tmp_path / "d")
    run(sd_folder, tmp_path / "out", "--train_data_dir", str(data), "--masked_loss", "--max_train_steps", "2",
        "--train_batch_size", "2", "--random_flip", *flags)
    assert len(masks) == 2 and all(m is not None and m.shape[:2] == (2, 1) for m in masks)
    assert all(0 < float(m.mean()) < 1 for m in masks)  # partly masked, as the alpha is
    assert (tmp_path / "out" / "model_index.json").is_file()


def test_mask_of_another_size_is_a_one_line_cli_error(sd_folder, tmp_path, capsys):
    from accelerate.state import AcceleratorState, GradientState

    from latent_diffusion.training.train_text2img import cli

    data = write_rgba(tmp_path / "d", 2)
    (tmp_path / "m").mkdir()
    Image.new("L", (10, 10), 255).save(tmp_path / "m" / "001.png")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    code = cli(["--pretrained_model_name_or_path", str(sd_folder), "--train_data_dir", str(data), "--output_dir",
                str(tmp_path / "out"), "--resolution", "32", "--report_to", "none", "--masked_loss", "--mask_dir",
                str(tmp_path / "m"), "--max_train_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "is 10×10 but its image" in err[-1] and err[-1].startswith("train_text2img.py: error:")
