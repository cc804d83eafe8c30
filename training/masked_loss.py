"""Masked loss (`--masked_loss`): each latent pixel's squared error weighted by the image's mask, as kohya does.

The mask is the image's alpha channel, or with `--mask_dir` a grayscale image of the same name and size there
(white: learn this region, black: ignore it); an image with neither trains unmasked (all ones), e.g. class
images. The mask goes through the sample's own crop, bucket resize and flip (its transform replayed with the
sample's generator), is reduced to the latent grid by area averaging, and the loss is
l = mean_{c,h,w}(m_hw · w(t) · (target − prediction)²) (kohya's `apply_masked_loss`).

With the cache, the masks of every row are prepared once at startup at latent size, for the cached crop and
its mirror image; each step picks the side the sample drew (its flip coin replayed).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image

from latent_diffusion.training.data import draw_flip, sample_generator
from latent_diffusion.training.folders import IMAGE_EXTENSIONS, ExtraFields


def add_masked_loss_args(g) -> None:
    g.add_argument("--masked_loss", action="store_true",
                   help="weight the loss by each image's mask: its alpha channel, or a --mask_dir image")
    g.add_argument("--mask_dir", default=None,
                   help="grayscale masks named as the images (white: learn, black: ignore); needs --masked_loss")


def check_masked_loss_args(args) -> list[str]:
    problems = []
    if args.mask_dir is not None and not args.masked_loss:
        problems.append("--mask_dir needs --masked_loss")
    if args.mask_dir is not None and not os.path.isdir(args.mask_dir):
        problems.append(f"--mask_dir {args.mask_dir!r} is not a folder")
    return problems


def image_path(cell) -> Optional[str]:
    """The file of a dataset image cell ({'path', 'bytes'} dict or a path), None when it has none."""
    return cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None


def open_cell(cell) -> Image.Image:
    import io

    if isinstance(cell, dict) and cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"]))
    return Image.open(image_path(cell))


def read_mask(cell, mask_dir: Optional[str]) -> Optional[Image.Image]:
    """The 'L' mask of one image cell: from `mask_dir` (same stem) or the image's alpha; None when it has none.

    ValueError when a mask's size differs from its image's.
    """
    image = open_cell(cell)
    if mask_dir is None:
        image = image.convert("RGBA") if image.mode == "P" else image
        return image.getchannel("A") if "A" in image.getbands() else None
    path = image_path(cell)
    if path is None:
        raise ValueError("--mask_dir needs images stored as files (this dataset's images have no path)")
    stem = os.path.splitext(os.path.basename(path))[0]
    found = [os.path.join(mask_dir, stem + ext) for ext in IMAGE_EXTENSIONS if os.path.isfile(os.path.join(mask_dir, stem + ext))]
    if not found:
        return None
    mask = Image.open(found[0])
    if mask.size != image.size:
        raise ValueError(f"--mask_dir: mask {found[0]!r} is {mask.width}×{mask.height} but its image {path!r} is "
                         f"{image.width}×{image.height}; masks must have their image's size")
    return mask.convert("L")


def transformed_mask(mask: Optional[Image.Image], size: tuple[int, int], transform,
                     generator: torch.Generator) -> torch.Tensor:
    """(1, H, W) mask in [0, 1] after `transform` (crop, bucket, flip) drawn from `generator`; ones without a mask."""
    mask = Image.new("L", size, 255) if mask is None else mask
    return (transform(mask.convert("RGB"), generator)[:1] + 1) / 2  # the transform gives pixels in [-1, 1]


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel masks -> (B, 1, h, w) latent masks: the mean over each latent pixel's area."""
    return F.interpolate(mask, size=latent_size, mode="area")


class MaskedSamples(ExtraFields):
    """Training samples with each sample's mask added as 'loss_mask' ((1, H, W) per item, or pixel- or latent-sized).

    On the fly (`cached_masks` None): the sample's transform replayed on its mask. Cached: the row's prepared
    latent-size masks [unflipped, flipped], the side given by the sample's replayed flip coin.
    """

    def __init__(self, samples, dataset, image_column: str, mask_dir: Optional[str], transform, seed: int,
                 cached_masks: Optional[dict] = None):
        super().__init__(samples, self.masks_of)
        self.dataset, self.image_column = dataset, image_column
        self.mask_dir, self.transform, self.seed, self.cached_masks = mask_dir, transform, seed, cached_masks

    def mask_of(self, index: int, epoch: int) -> torch.Tensor:
        generator = sample_generator(self.seed, index, epoch)
        if self.cached_masks is not None:
            return self.cached_masks[int(index)][int(draw_flip(generator, self.transform.random_flip))]
        cell = self.dataset[int(index)][self.image_column]
        return transformed_mask(read_mask(cell, self.mask_dir), open_cell(cell).size, self.transform, generator)

    def masks_of(self, items) -> dict[str, torch.Tensor]:
        return {"loss_mask": torch.stack([self.mask_of(*item) for item in items])}


def cached_masks(dataset, image_column: str, mask_dir: Optional[str], transform, rows, latent_factor: int) -> dict:
    """row -> (S, 1, h, w) latent masks of the cache's fixed crop (S = 2: and mirrored), as the cache crops them."""
    fixed = dataclasses.replace(transform, random_flip=False)
    masks = {}
    for index in rows:
        cell = dataset[int(index)][image_column]
        mask = transformed_mask(read_mask(cell, mask_dir), open_cell(cell).size, fixed,
                                sample_generator(0, index, epoch=-1))[None]  # the cache's crop of this row
        small = latent_mask(mask, (mask.shape[-2] // latent_factor, mask.shape[-1] // latent_factor))[0]
        masks[int(index)] = torch.stack([small, small.flip(-1)])
    return masks


def check_masks(dataset, image_column: str, mask_dir: Optional[str], rows) -> int:
    """Read every mask once (a size mismatch fails before training); how many images have one."""
    return sum(read_mask(dataset[int(i)][image_column], mask_dir) is not None for i in rows)


def masked_samples(samples, dataset, image_column: str, mask_dir: Optional[str], transform, seed: int, rows,
                   cached: bool, latent_factor: int) -> MaskedSamples:
    """`samples` with their masks (see MaskedSamples); ValueError naming --masked_loss when no image has one."""
    if not check_masks(dataset, image_column, mask_dir, rows):
        raise ValueError("--masked_loss: none of the images has an alpha channel or a mask in --mask_dir")
    masks = cached_masks(dataset, image_column, mask_dir, transform, rows, latent_factor) if cached else None
    return MaskedSamples(samples, dataset, image_column, mask_dir, transform, seed, masks)
