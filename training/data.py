"""Caption datasets for text-to-image training: loading, column checks, image transforms, unreadable images.

A dataset here is a `datasets.Dataset` with an image column and a caption
column. Images are decoded by us (the image column is cast to
`Image(decode=False)`), so that an unreadable file is skipped and counted
instead of crashing a run. A caption cell may be a string or a list of
strings (several captions of one image); `pick_caption` chooses one.

Every random choice (crop offset, flip, caption variant, caption dropout) is
drawn from a `torch.Generator` seeded per sample by the caller, so a sample
is a pure function of (index, seed): data-loader workers, process count and
resuming mid-epoch do not change what a step sees.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from latent_diffusion.formats.images import as_seen, read_image

logger = logging.getLogger(__name__)


def load_caption_dataset(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    image_column: str = "image",
    caption_column: str = "text",
    max_train_samples: Optional[int] = None,
    cache_dir: Optional[str] = None,
    split: str = "train",
):
    """Load a Hub dataset, a local dataset path, or an imagefolder (`train_data_dir` with metadata.jsonl).

    Checks both columns exist (ValueError naming the available ones), keeps
    only them, and leaves images undecoded.
    """
    import datasets

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("give exactly one of dataset_name (--dataset_name) or train_data_dir (--train_data_dir)")
    if dataset_name is not None:
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    else:
        import os

        if not os.path.isdir(train_data_dir):
            raise ValueError(f"train_data_dir (--train_data_dir) {train_data_dir!r} is not a folder")
        loaded = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"dataset has no {split!r} split; it has {sorted(loaded)}")
        loaded = loaded[split]
    check_columns(loaded.column_names, image_column, caption_column)
    loaded = loaded.select_columns([image_column, caption_column])
    if isinstance(loaded.features[image_column], datasets.Image):
        loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
    if max_train_samples is not None:
        if max_train_samples < 1:
            raise ValueError(f"max_train_samples (--max_train_samples) must be >= 1, got {max_train_samples}")
        loaded = loaded.select(range(min(max_train_samples, len(loaded))))
    return loaded


def check_columns(columns: Sequence[str], image_column: str, caption_column: str) -> None:
    """ValueError naming the flag and the dataset's columns when a requested column is missing."""
    for flag, name in (("--image_column", image_column), ("--caption_column", caption_column)):
        if name not in columns:
            raise ValueError(f"{flag} {name!r} is not a column of the dataset; its columns are {list(columns)}")


def decode_image(cell: Any) -> Optional[Image.Image]:
    """An RGB PIL image from a dataset cell (PIL image, {'bytes', 'path'} dict, path or bytes) as viewers show it
    (EXIF rotation applied, 16-bit pixels scaled: `latent_diffusion.formats.images`); None if unreadable."""
    try:
        if isinstance(cell, Image.Image):
            return as_seen(cell).convert("RGB")
        if isinstance(cell, dict):
            return read_image(cell["bytes"] if cell.get("bytes") else cell["path"])
        return read_image(cell)
    except Exception as err:  # any decoder failure means "unreadable", never a crash
        logger.debug("unreadable image skipped: %s", err)
        return None


def readable_indices(dataset, image_column: str, indices: Optional[Sequence[int]] = None) -> tuple[list[int], list[int]]:
    """(readable, unreadable) dataset indices, found by decoding every image once."""
    readable, unreadable = [], []
    column = dataset.select_columns([image_column])
    for i in range(len(dataset)) if indices is None else indices:
        (readable if decode_image(column[int(i)][image_column]) is not None else unreadable).append(int(i))
    return readable, unreadable


def caption_variants(cell: Any) -> list[str]:
    """The captions of one sample: a string gives one, a list gives each of its strings."""
    if isinstance(cell, str):
        return [cell]
    if isinstance(cell, (list, tuple)) and cell and all(isinstance(c, str) for c in cell):
        return list(cell)
    raise ValueError(f"caption cells must be a string or a non-empty list of strings, got {cell!r}")


def pick_caption_index(num_variants: int, generator: torch.Generator, caption_dropout: float = 0.0) -> Optional[int]:
    """Which caption variant a step uses (uniform), or None, the empty caption, with probability `caption_dropout`."""
    drop = torch.rand((), generator=generator).item() < caption_dropout
    choice = int(torch.randint(num_variants, (), generator=generator))
    return None if drop else choice


def pick_caption(variants: Sequence[str], generator: torch.Generator, caption_dropout: float = 0.0) -> str:
    """One caption variant chosen uniformly, or "" with probability `caption_dropout` (for classifier-free guidance)."""
    choice = pick_caption_index(len(variants), generator, caption_dropout)
    return "" if choice is None else variants[choice]


def crop_box(size: tuple[int, int], resolution: int, center_crop: bool,
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of `resize_and_crop` for an image of `size` (width, height)."""
    width, height = size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left = int(torch.randint(new_w - resolution + 1, (), generator=generator))
        top = int(torch.randint(new_h - resolution + 1, (), generator=generator))
    return new_w, new_h, left, top


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool, generator: torch.Generator) -> Image.Image:
    """Resize the shorter side to `resolution` (bilinear), then crop a square: centred, or at a random offset."""
    new_w, new_h, left, top = crop_box(image.size, resolution, center_crop, generator)
    image = image.resize((new_w, new_h), Image.BILINEAR)
    return image.crop((left, top, left + resolution, top + resolution))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 pixels in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> (3, resolution, resolution) pixels in [-1, 1]: resize, crop, optional random horizontal flip."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        pixels = to_tensor(resize_and_crop(image, self.resolution, self.center_crop, generator))  # (3, H, W)
        return pixels.flip(-1) if draw_flip(generator, self.random_flip) else pixels


def draw_flip(generator: torch.Generator, random_flip: bool) -> bool:
    """Whether a sample is flipped horizontally: a fair coin when `random_flip`, else never (the coin is drawn anyway)."""
    return bool(torch.rand((), generator=generator).item() < 0.5) and random_flip


def sample_generator(seed: int, index: int, epoch: int) -> torch.Generator:
    """The generator of one sample in one epoch: a pure function of (seed, epoch, index)."""
    return torch.Generator().manual_seed(hash((int(seed), int(epoch), int(index))) & 0x7FFF_FFFF_FFFF_FFFF)


class CaptionImageDataset(torch.utils.data.Dataset):
    """The on-the-fly training samples: item (index, epoch) -> {'pixels': (3, H, W), 'caption': str, 'index'}.

    Only readable indices should be asked for (see `readable_indices`); an
    image that still fails to decode raises a ValueError naming it.
    """

    def __init__(self, dataset, image_column: str, caption_column: str, transform: ImageTransform,
                 caption_dropout: float = 0.0, seed: int = 0, caption_transform=None):
        self.dataset, self.transform = dataset, transform
        self.image_column, self.caption_column = image_column, caption_column
        self.caption_dropout, self.seed = caption_dropout, seed
        self.caption_transform = caption_transform  # (caption, generator) -> caption: tag shuffling (captions.py)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, epoch = item
        row = self.dataset[int(index)]
        generator = sample_generator(self.seed, index, epoch)
        image = decode_image(row[self.image_column])
        if image is None:
            raise ValueError(f"image {index} of the dataset could not be read")
        pixels = self.transform(image, generator)  # draws crop, flip, then the caption: as `CachedSamples` does
        caption = pick_caption(caption_variants(row[self.caption_column]), generator, self.caption_dropout)
        if self.caption_transform is not None:
            caption = self.caption_transform(caption, generator)
        return {"pixels": pixels, "caption": caption, "index": int(index)}
