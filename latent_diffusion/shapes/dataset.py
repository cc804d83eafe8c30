"""Shapes data in the forms training wants: an in-memory datasets.Dataset, an endless stream, an imagefolder.

Every example is a pure function of (seed, index, size, split): example i
draws from its own numpy Generator seeded with (seed, i), samples a scene,
renders it and writes its caption. So the three forms agree with each other
(`shapes_dataset(n)[i]`, the i-th item of `shapes_stream()` and the i-th
exported file hold the same image and text), any prefix is reproducible, and
a stream split over DataLoader workers or machines still yields every index
exactly once.

* `shapes_dataset` holds the images PNG-encoded in memory (a few hundred
  bytes each at 64 px), so hundreds of thousands fit comfortably.
* `shapes_stream` is a datasets.IterableDataset over a generator, endless by
  default. It declares no features, so PIL images pass through as rendered,
  without a PNG round trip. With the default `num_shards=1` it yields
  examples 0, 1, 2, ... in order. With `num_shards=k`, example i belongs to
  shard i % k, and DataLoader workers or `split_dataset_by_node` ranks each
  take whole shards; note that datasets reads shards one after another, so a
  single reader of an endless k-shard stream sees only shard 0 (still
  endless, still all distinct examples).
* `export_imagefolder` writes 000000.png, ... and metadata.jsonl
  ({"file_name", "text"}), the layout `datasets.load_dataset("imagefolder",
  data_dir=...)` and diffusers' `train_text_to_image.py` read.

Captions drop optional parts at random (`drop_optional=True`, for training);
pass `drop_optional=False` for full captions (evaluation sets). `outline=True`
adds a "conditioning_image" column, the scene's outline control image
(`shapes/outline.py`), for ControlNet training.
"""
from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import datasets
import numpy as np
from tqdm.auto import tqdm

from latent_diffusion.formats.atomic import write_text_atomic
from latent_diffusion.shapes.captions import caption
from latent_diffusion.shapes.outline import outline_image
from latent_diffusion.shapes.world import check_size, check_split, render, sample_scene

FEATURES = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
CONDITIONING_COLUMN = "conditioning_image"  # diffusers' train_controlnet.py default column name
METADATA_FILE = "metadata.jsonl"
OUTLINE_FOLDER = "conditioning"  # export_imagefolder(outline=True): the outline control images


def _check_count(num_examples, name: str = "num_examples", allow_none: bool = False) -> Optional[int]:
    if num_examples is None and allow_none:
        return None
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 0:
        raise ValueError(f"{name} must be a non-negative int{' or None' if allow_none else ''}; got {num_examples!r}")
    return int(num_examples)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")
    return int(seed)


def shapes_example(index: int, size: int = 64, seed: int = 0, split: str = "train", drop_optional: bool = True,
                   outline: bool = False) -> dict:
    """Example `index` of the (seed, split) sequence: {"image": PIL RGB image of side `size`, "text": caption},
    with `outline` also "conditioning_image": the scene's outline (the caption is drawn first, so it is the same)."""
    rng = np.random.default_rng((seed, index))
    scene = sample_scene(rng, split)
    example = {"image": render(scene, size), "text": caption(scene, rng, drop_optional)}
    if outline:
        example[CONDITIONING_COLUMN] = outline_image(scene, size)
    return example


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_dataset(
    num_examples: int, size: int = 64, seed: int = 0, split: str = "train", drop_optional: bool = True,
    outline: bool = False,
) -> datasets.Dataset:
    """A datasets.Dataset of `num_examples` Shapes examples, columns "image" (PIL) and "text" (with `outline`, also
    "conditioning_image"); the same for the same seed."""
    num_examples, size, seed = _check_count(num_examples), check_size(size), _check_seed(seed)
    check_split(split)
    columns: dict[str, list] = {}
    for index in range(num_examples):
        example = shapes_example(index, size, seed, split, drop_optional, outline)
        for key, value in example.items():
            columns.setdefault(key, []).append(value if key == "text" else {"bytes": _png_bytes(value), "path": None})
    features = datasets.Features({**FEATURES, **({CONDITIONING_COLUMN: datasets.Image()} if outline else {})})
    return datasets.Dataset.from_dict({key: columns.get(key, []) for key in features}, features=features)


def _stream_examples(
    shards: list[int], num_shards: int, num_examples: Optional[int], size: int, seed: int, split: str, drop_optional: bool
) -> Iterator[dict]:
    """Examples whose index falls in `shards` (index % num_shards), in index order; endless when num_examples is None."""
    indices = itertools.count() if num_examples is None else range(num_examples)
    mine = set(shards)
    for index in indices:
        if index % num_shards in mine:
            yield shapes_example(index, size, seed, split, drop_optional)


def shapes_stream(
    num_examples: Optional[int] = None,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
    drop_optional: bool = True,
    num_shards: int = 1,
) -> datasets.IterableDataset:
    """A datasets.IterableDataset yielding {"image", "text"}: endless when num_examples is None, else that many."""
    num_examples, size, seed = _check_count(num_examples, allow_none=True), check_size(size), _check_seed(seed)
    check_split(split)
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int; got {num_shards!r}")
    gen_kwargs = dict(
        shards=list(range(num_shards)), num_shards=num_shards, num_examples=num_examples,
        size=size, seed=seed, split=split, drop_optional=drop_optional,
    )
    return datasets.IterableDataset.from_generator(_stream_examples, gen_kwargs=gen_kwargs)


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    """Create out_dir; refuse a non-empty one unless overwrite, which clears a previous export's files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = list(out_dir.iterdir())
    if existing and not overwrite:
        raise FileExistsError(f"out_dir {str(out_dir)!r} is not empty; pass overwrite=True to replace an export there")
    for path in existing:
        if path.name == METADATA_FILE or (path.suffix == ".png" and path.stem.isdigit()):
            path.unlink()
        elif path.name == OUTLINE_FOLDER and path.is_dir():
            for image in path.glob("*.png"):
                image.unlink()


def export_imagefolder(
    out_dir: Union[str, os.PathLike],
    num_examples: int,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
    drop_optional: bool = True,
    overwrite: bool = False,
    outline: bool = False,
) -> Path:
    """Write `num_examples` PNGs and metadata.jsonl ({"file_name", "text"}) into out_dir, with a progress bar; return it.

    The folder loads with `datasets.load_dataset("imagefolder", data_dir=out_dir)` (columns "image", "text").
    With `outline`, each scene's outline control image goes to out_dir/conditioning/ and metadata.jsonl names it
    in "conditioning_image_file_name", which imagefolder reads as a "conditioning_image" image column.
    metadata.jsonl is written last, through a temporary file, so a folder that has one is complete.
    """
    num_examples, size, seed = _check_count(num_examples), check_size(size), _check_seed(seed)
    check_split(split)
    out_dir = Path(out_dir)
    _prepare_folder(out_dir, overwrite)
    width = max(6, len(str(max(num_examples - 1, 0))))
    lines = []
    if outline:
        (out_dir / OUTLINE_FOLDER).mkdir(exist_ok=True)
    for index in tqdm(range(num_examples), desc=f"Shapes {split} {size}px", unit="img"):
        example = shapes_example(index, size, seed, split, drop_optional, outline)
        file_name = f"{index:0{width}d}.png"
        example["image"].save(out_dir / file_name)
        row = {"file_name": file_name, "text": example["text"]}
        if outline:
            row[f"{CONDITIONING_COLUMN}_file_name"] = f"{OUTLINE_FOLDER}/{file_name}"
            example[CONDITIONING_COLUMN].save(out_dir / row[f"{CONDITIONING_COLUMN}_file_name"])
        lines.append(json.dumps(row))
    write_text_atomic(out_dir / METADATA_FILE, "".join(line + "\n" for line in lines))
    return out_dir
