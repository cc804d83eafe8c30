"""Caption datasets: loading, column errors, unreadable images, transforms, caption choice."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.training.data import (CaptionImageDataset, ImageTransform, caption_variants, decode_image,
                                   load_caption_dataset, pick_caption, readable_indices, sample_generator)


def make_imagefolder(folder, n=4, captions=None, broken=(), size=(40, 36)):
    """n random RGB PNGs with metadata.jsonl; indices in `broken` get a file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    captions = captions or ["a red circle above a blue square", "a cat on a sofa"]
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(n):
            path = folder / f"{i:03d}.png"
            if i in broken:
                path.write_bytes(b"this is not a png")
            else:
                Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
            f.write(json.dumps({"file_name": path.name, "text": captions[i % len(captions)]}) + "\n")
    return folder


def test_imagefolder_loads_undecoded(tmp_path):
    ds = load_caption_dataset(train_data_dir=str(make_imagefolder(tmp_path / "d", 3)))
    assert len(ds) == 3 and ds.column_names == ["image", "text"]
    assert decode_image(ds[0]["image"]).size == (40, 36)


def test_unknown_column_names_the_flag_and_columns(tmp_path):
    folder = str(make_imagefolder(tmp_path / "d", 2))
    with pytest.raises(ValueError, match=r"--caption_column 'caption'.*\['image', 'text'\]"):
        load_caption_dataset(train_data_dir=folder, caption_column="caption")
    with pytest.raises(ValueError, match="--image_column 'img'"):
        load_caption_dataset(train_data_dir=folder, image_column="img")


def test_missing_folder_and_max_train_samples(tmp_path):
    with pytest.raises(ValueError, match="--train_data_dir"):
        load_caption_dataset(train_data_dir=str(tmp_path / "nope"))
    ds = load_caption_dataset(train_data_dir=str(make_imagefolder(tmp_path / "d", 5)), max_train_samples=2)
    assert len(ds) == 2


def test_unreadable_images_are_found_not_raised(tmp_path):
    ds = load_caption_dataset(train_data_dir=str(make_imagefolder(tmp_path / "d", 4, broken=(1, 3))))
    assert readable_indices(ds, "image") == ([0, 2], [1, 3])
    assert decode_image(b"garbage") is None


def test_transform_shape_range_and_flip():
    image = Image.fromarray(np.arange(40 * 36 * 3, dtype=np.uint8).reshape(36, 40, 3))
    g = torch.Generator().manual_seed(0)
    pixels = ImageTransform(32, center_crop=True)(image, g)
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    flips = {bool(torch.equal(ImageTransform(32, True, random_flip=True)(image, sample_generator(0, i, 0)), pixels))
             for i in range(20)}
    assert flips == {True, False}  # some samples flipped, some not


def test_caption_variants_and_dropout():
    assert caption_variants("a") == ["a"] and caption_variants(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError):
        caption_variants(42)
    g = torch.Generator().manual_seed(0)
    picks = [pick_caption(["a", "b"], g, caption_dropout=0.3) for _ in range(2000)]
    assert abs(picks.count("") / 2000 - 0.3) < 0.04
    assert picks.count("a") > 500 and picks.count("b") > 500
    assert all(pick_caption(["a"], g, 1.0) == "" for _ in range(10))


def test_samples_are_a_pure_function_of_index_and_epoch(tmp_path):
    ds = load_caption_dataset(train_data_dir=str(make_imagefolder(tmp_path / "d", 3)))
    samples = CaptionImageDataset(ds, "image", "text", ImageTransform(32, random_flip=True), caption_dropout=0.5)
    a, b = samples[(1, 0)], samples[(1, 0)]
    assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
    assert any(not torch.equal(samples[(1, e)]["pixels"], a["pixels"]) for e in range(1, 8))  # crops/flips vary
