"""Image inputs for the evaluation measures: one format in, batches of float tensors out.

Accepted everywhere an evaluation function takes `images`:

- a folder (str or Path): its image files (png, jpg, jpeg, webp, bmp), sorted by name, read lazily;
- a list of PIL images (what `pipe(...).images` returns);
- a numpy array (N, H, W, 3) or (H, W, 3), uint8 in [0, 255] or float in [0, 1] (diffusers' `output_type="np"`);
- a torch tensor (N, 3, H, W) or (3, H, W), uint8 in [0, 255] or float in [0, 1];
- a list mixing single images of those kinds (sizes may differ).

Every image becomes a float32 tensor (3, H, W) in [0, 1].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted by name; a clear error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(folder)!r}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"image folder {str(folder)!r} holds no images with extensions {IMAGE_EXTENSIONS}")
    return files


def iter_images(images) -> Iterator[torch.Tensor]:
    """Yield each image of `images` (any accepted form, see the module docstring) as float (3, H, W) in [0, 1]."""
    if isinstance(images, (str, os.PathLike)):
        for path in list_image_files(images):
            with Image.open(path) as image:
                yield pil_to_tensor(image)
    elif isinstance(images, (torch.Tensor, np.ndarray)) and _is_batch(images):
        for image in images:
            yield to_tensor(image)
    elif isinstance(images, Iterable) and not isinstance(images, (torch.Tensor, np.ndarray, Image.Image)):
        for image in images:
            yield to_tensor(image)
    else:
        yield to_tensor(images)


def iter_batches(images, batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Lists of at most `batch_size` images (float (3, H, W) in [0, 1]), in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    batch: list[torch.Tensor] = []
    for image in iter_images(images):
        batch.append(image)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def stack_same_size(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a list of (3, H, W) images into runs of equal size, each stacked to (B, 3, H, W), order kept."""
    runs: list[list[torch.Tensor]] = []
    for image in batch:
        if runs and runs[-1][0].shape == image.shape:
            runs[-1].append(image)
        else:
            runs.append([image])
    return [torch.stack(run) for run in runs]


def to_tensor(image) -> torch.Tensor:
    """One image (PIL, numpy HWC, or torch CHW) → float32 (3, H, W) in [0, 1]."""
    if isinstance(image, Image.Image):
        return pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        return _scale(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1) if image.ndim == 3 else None,
                      image)
    if isinstance(image, torch.Tensor):
        return _scale(image.detach().cpu() if image.ndim == 3 else None, image)
    raise TypeError(f"images must be a folder, PIL images, numpy arrays or torch tensors; got {type(image).__name__}")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image (any mode) → RGB float32 (3, H, W) in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


def to_pil(image: torch.Tensor) -> Image.Image:
    """float (3, H, W) in [0, 1] → RGB PIL image (rounded to uint8, as saving a PNG would)."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


def _is_batch(array) -> bool:
    return array.ndim == 4


def _scale(chw: torch.Tensor | None, original) -> torch.Tensor:
    """Check a (C, H, W) tensor has 1 or 3 channels and map it to float RGB in [0, 1]."""
    if chw is None or chw.shape[0] not in (1, 3):
        layout = "(H, W, 3)" if isinstance(original, np.ndarray) else "(3, H, W)"
        raise ValueError(f"each image must be {layout} (RGB); got shape {tuple(original.shape)}")
    if chw.shape[0] == 1:
        chw = chw.expand(3, -1, -1)
    if chw.dtype == torch.uint8:
        return chw.float() / 255.0
    chw = chw.float()
    if chw.numel() and (chw.min() < -1e-3 or chw.max() > 1.0 + 1e-3):
        raise ValueError(
            f"float images must lie in [0, 1]; got values in [{chw.min():.3f}, {chw.max():.3f}] "
            "(map [-1, 1] images with (x + 1) / 2 first)"
        )
    return chw.clamp(0.0, 1.0)
