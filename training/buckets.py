"""Aspect-ratio buckets: train each image near its own shape instead of a square crop (kohya's sd-scripts scheme).

A bucket is a (width, height) of about `resolution`² pixels, both sides
multiples of `step` within [min_reso, max_reso]. Each image goes to the bucket
whose aspect ratio w/h is nearest its own, is resized to cover the bucket
(the smallest scale at which both sides reach it) and centre-cropped to it, so
at most a thin strip is lost on one axis. Every batch is drawn from one bucket
(see `latent_diffusion.training.bucketing`), so its tensors stack.

    buckets = make_buckets(512, 256, 1024, 64)      # [(256, 1024), ..., (512, 512), ..., (1024, 256)]
    nearest_bucket(640, 480, buckets)               # (576, 448)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from latent_diffusion.training.data import draw_flip, to_tensor

Size = tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 1024, step: int = 64) -> list[Size]:
    """Bucket sizes (width, height), sorted: the square nearest resolution², and for each width from min_reso to
    max_reso in `step`s the tallest height (a multiple of `step`, at most max_reso) with width × height ≤ resolution²,
    with its transpose."""
    for name, value in (("resolution", resolution), ("min_reso", min_reso), ("max_reso", max_reso), ("step", step)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if min_reso > max_reso:
        raise ValueError(f"min_reso ({min_reso}) must be <= max_reso ({max_reso})")
    area = resolution * resolution
    side = (int(math.sqrt(area)) // step) * step
    sizes = {(side, side)} if min_reso <= side <= max_reso else set()
    for width in range(min_reso, max_reso + 1, step):
        height = min(max_reso, (area // width) // step * step)
        if height >= min_reso:
            sizes.update({(width, height), (height, width)})
    if not sizes:
        raise ValueError(f"no bucket fits: resolution {resolution}, min_reso {min_reso}, max_reso {max_reso}, "
                         f"step {step}")
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio is nearest width / height (the first of equals, in the given order)."""
    ratio = width / height
    return min(buckets, key=lambda size: abs(size[0] / size[1] - ratio))


def resize_to_cover(image: Image.Image, size: Size) -> Image.Image:
    """Scale (bilinear, as the square path does) so both sides cover `size`, then centre-crop to it."""
    target_w, target_h = size
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))


@dataclass(frozen=True)
class BucketTransform:
    """PIL image -> (3, h, w) pixels in [-1, 1] at its bucket's size: cover-resize, centre crop, optional flip.

    Takes the place of `ImageTransform` (same call, same `random_flip` and `resolution` fields), so the
    on-the-fly dataset and the latent cache use it unchanged; it never crops at random.
    """

    buckets: tuple[Size, ...]
    resolution: int
    random_flip: bool = False
    center_crop: bool = True  # always: bucketing never crops at random

    def bucket_of(self, image: Image.Image) -> Size:
        return nearest_bucket(image.size[0], image.size[1], self.buckets)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        pixels = to_tensor(resize_to_cover(image, self.bucket_of(image)))  # (3, h, w)
        return pixels.flip(-1) if draw_flip(generator, self.random_flip) else pixels
