"""A cache of VAE latents and text embeddings: encode a caption dataset once, train from tensors after.

Layout of one cache, `cache_dir/<key>/`:

    shard-00000-of-00002.safetensors   one per process that built it:
        indices        (n,)             dataset rows it holds (readable images only)
        unreadable     (u,)             dataset rows whose image could not be read
        latent_mean    (n, S, C, h, w)  scaled posterior mean of the VAE: S = 2 [unflipped, flipped] when the
                                        transform flips at random, else S = 1 [unflipped] (half the encoding)
        latent_std     (n, S, C, h, w)  scaled posterior std, so every step draws a fresh z like the on-the-fly path
        text_embeds    (m, L, D)        every caption variant of those rows, in row order
        pooled_embeds  (m, P)           SDXL only: the second text encoder's pooled projection of each variant
        caption_counts (n,)             variants per row
        original_size  (n, 2)           (height, width) of each image before resizing (SDXL micro-conditioning)
        crop_top_left  (n, S, 2)        (top, left) of the crop in the resized image, per side (mirrored second)
    empty.safetensors                   embedding of the empty caption (L, D) (and its pooled (P,) for SDXL)
    manifest.json                       written last: the cache is complete when it exists; it holds the
                                        sha256 and size of every file above, checked on every load

With aspect-ratio buckets (`latent_diffusion.training.buckets.BucketTransform`) each row
has its bucket's latent size, so `latent_mean` / `latent_std` are stored flat,
row after row, with `latent_shapes` (n, 4) = (S, C, h, w) per row, and load as
a list of per-row (S, C, h, w) tensors.

The key hashes the VAE and text-encoder weights (both encoders for SDXL), the tokenizer(s), the
resolution, the crop and flip modes and the dataset fingerprint, so a change to any of
them selects a fresh folder and the cache is rebuilt. A cache whose files fail their checksums (bytes
overwritten, a shard truncated or missing, the manifest unreadable) is rebuilt in place, with a warning. Images are cropped
once: centred with `center_crop`, else at a fixed random offset per image.

Sharding takes plain `rank`, `world_size` and a `barrier` callable; the
library does not know about accelerate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from latent_diffusion.text.encoding import encode_prompts
from latent_diffusion.vae import latent_scale, scale_latents, vae_scale_factor
from latent_diffusion.training.data import (ImageTransform, caption_variants, crop_box, decode_image, draw_flip, pick_caption_index,
                   sample_generator)
from latent_diffusion.text.conditioners import SDXLConditioner
from latent_diffusion.formats.atomic import atomic_write, write_text_atomic

CACHE_FORMAT = 2  # 2: original sizes and crops of every image, pooled embeddings for SDXL
MANIFEST = "manifest.json"
EMPTY = "empty.safetensors"


# ----------------------------------------------------------------------------- keys


def fingerprint_module(module: torch.nn.Module) -> str:
    """sha256 of a module's state: names, dtypes, shapes and bytes of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fingerprint_tokenizer(tokenizer) -> str:
    """sha256 of a tokenizer's class, vocabulary and window."""
    payload = json.dumps(
        [type(tokenizer).__name__, tokenizer.model_max_length, sorted(tokenizer.get_vocab().items())]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_key(vae, text_encoder, tokenizer, *, resolution: int, center_crop: bool, dataset_fingerprint: str,
              image_column: str = "image", caption_column: str = "text", random_flip: bool = True,
              text_encoder_2=None, tokenizer_2=None, buckets: Optional[Sequence[int]] = None) -> str:
    """A short hex key naming everything the cached tensors depend on (the second encoder too, for SDXL;
    `buckets`: the bucket settings, if any)."""
    parts = dict(
        format=CACHE_FORMAT,
        vae=fingerprint_module(vae),
        text_encoder=fingerprint_module(text_encoder),
        tokenizer=fingerprint_tokenizer(tokenizer),
        resolution=int(resolution),
        center_crop=bool(center_crop),
        flipped=bool(random_flip),
        dataset=str(dataset_fingerprint),
        columns=[image_column, caption_column],
    )
    if text_encoder_2 is not None:
        parts.update(text_encoder_2=fingerprint_module(text_encoder_2), tokenizer_2=fingerprint_tokenizer(tokenizer_2))
    if buckets is not None:  # only then, so caches of square crops keep their keys
        parts["buckets"] = [int(b) for b in buckets]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_latent_moments(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) pixels -> scaled posterior (mean, std), each (B, C, H/f, W/f): z = mean + std · ε."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return scale_latents(vae, dist.mean), dist.std * latent_scale(vae)[0]  # std scales, it does not shift


def sample_latents(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z ~ N(mean, std²) reparameterised: z = mean + std · ε (the VAE posterior, already scaled)."""
    return mean + std * noise


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: Sequence[str]) -> torch.Tensor:
    """Captions -> (B, L, D) embeddings of one tokenizer window (longer captions are truncated with a warning)."""
    return encode_prompts(tokenizer, text_encoder, list(captions), num_chunks=1)


@torch.no_grad()
def encode_caption_tensors(tokenizer, text_encoder, captions: Sequence[str], tokenizer_2=None,
                           text_encoder_2=None) -> dict[str, torch.Tensor]:
    """`caption_tensors` without gradients (frozen encoders: the cache and the on-the-fly path)."""
    return caption_tensors(tokenizer, text_encoder, captions, tokenizer_2, text_encoder_2)


def caption_tensors(tokenizer, text_encoder, captions: Sequence[str], tokenizer_2=None,
                    text_encoder_2=None) -> dict[str, torch.Tensor]:
    """{"text_embeds": (B, L, D)}, plus "pooled_embeds" (B, P) for SDXL (both encoders, as the pipeline encodes);
    with gradients when the encoders train (--train_text_encoder, --train_text_encoder_lora)."""
    if text_encoder_2 is None:
        return {"text_embeds": encode_prompts(tokenizer, text_encoder, list(captions), num_chunks=1)}
    cond = SDXLConditioner(tokenizer, text_encoder, tokenizer_2, text_encoder_2).encode_texts(list(captions),
                                                                                              num_chunks=1)
    return {"text_embeds": cond.context, "pooled_embeds": cond.text_embeds}


# ----------------------------------------------------------------------------- the cache


@dataclass
class LatentCache:
    """Cached tensors of every readable row, in row order of `indices`."""

    indices: torch.Tensor  # (N,) dataset rows
    unreadable: torch.Tensor  # (U,) dataset rows skipped
    latent_mean: Union[torch.Tensor, list]  # (N, S, C, h, w), S = 2 with mirrored latents; bucketed: N × (S, C, h, w)
    latent_std: Union[torch.Tensor, list]  # (N, S, C, h, w), or N × (S, C, h, w)
    text_embeds: torch.Tensor  # (M, L, D)
    caption_offsets: torch.Tensor  # (N + 1,) row i's variants are text_embeds[offsets[i]:offsets[i+1]]
    empty_embed: torch.Tensor  # (L, D)
    original_size: torch.Tensor  # (N, 2) (height, width) before resizing
    crop_top_left: torch.Tensor  # (N, S, 2) (top, left) in the resized image, per side
    pooled_embeds: Optional[torch.Tensor] = None  # (M, P), SDXL only
    empty_pooled: Optional[torch.Tensor] = None  # (P,), SDXL only

    def __len__(self) -> int:
        return self.indices.shape[0]


def build_or_load_cache(
    cache_dir: str,
    key: str,
    dataset,
    *,
    vae,
    text_encoder,
    tokenizer,
    transform: ImageTransform,
    image_column: str,
    caption_column: str,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Optional[Callable[[int], Any]] = None,
    text_encoder_2=None,
    tokenizer_2=None,
) -> tuple[LatentCache, bool]:
    """(cache, hit): load `cache_dir/key`, or build it first with each rank encoding rows rank::world_size.

    Every rank must call this (it holds barriers). `progress(n)` is called as rows are encoded.
    With `text_encoder_2` (SDXL) the captions go through both encoders and their pooled embeddings are kept.
    """
    encoders = dict(tokenizer=tokenizer, text_encoder=text_encoder, tokenizer_2=tokenizer_2,
                    text_encoder_2=text_encoder_2)
    folder = os.path.join(cache_dir, key)
    problem = verify_cache(folder)
    hit = problem is None
    if not hit and os.path.exists(os.path.join(folder, MANIFEST)):
        warnings.warn(f"latent cache {folder}: {problem}; rebuilding it", stacklevel=2)
    barrier()  # every rank has read the old files before any rank overwrites them
    if not hit:
        os.makedirs(folder, exist_ok=True)
        shard = f"shard-{rank:05d}-of-{world_size:05d}.safetensors"
        rows = range(rank, len(dataset), world_size)
        tensors = _encode_rows(dataset, rows, vae, encoders, transform, image_column, caption_column, batch_size,
                               progress)
        _save_atomic(tensors, os.path.join(folder, shard))
        if rank == 0:
            empty = encode_caption_tensors(captions=[""], **encoders)
            names = {"text_embeds": "empty_embed", "pooled_embeds": "empty_pooled"}
            _save_atomic({names[k]: v[0].cpu().contiguous() for k, v in empty.items()},
                         os.path.join(folder, EMPTY))
        barrier()
        if rank == 0:
            shards = [f"shard-{r:05d}-of-{world_size:05d}.safetensors" for r in range(world_size)]
            manifest = dict(format=CACHE_FORMAT, key=key, rows=len(dataset), shards=shards,
                            files={name: file_digest(os.path.join(folder, name)) for name in [*shards, EMPTY]})
            write_text_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=2))
        barrier()
    return load_cache(folder), hit


def file_digest(path: str) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def verify_cache(folder: str) -> Optional[str]:
    """None when the cache in `folder` is complete and every file matches its manifest's checksum; else why not."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return "no manifest (not built, or its build was interrupted)"
    try:
        with open(path) as f:
            manifest = json.load(f)
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
        if not set(manifest["shards"]) | {EMPTY} <= set(expected):
            return "its manifest lists a file it has no checksum for"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its manifest is unreadable ({type(error).__name__})"
    for name, (size, sha256) in expected.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        found = file_digest(file)
        if found["bytes"] != size:
            return f"{name} has {found['bytes']} bytes, not the {size} written"
        if found["sha256"] != sha256:
            return f"{name} fails its sha256 checksum (its bytes changed)"
    return None


def load_cache(folder: str) -> LatentCache:
    """Read a complete cache folder (any shard count) into one `LatentCache`, rows sorted by dataset index."""
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    shards = [load_file(os.path.join(folder, name)) for name in manifest["shards"]]
    indices = torch.cat([s["indices"] for s in shards])
    order = torch.argsort(indices)
    counts = torch.cat([s["caption_counts"] for s in shards])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # offsets in concatenated order

    def variants_in_row_order(name: str) -> Optional[torch.Tensor]:
        if name not in shards[0]:
            return None
        embeds = torch.cat([s[name] for s in shards])
        return torch.cat([embeds[starts[i]:starts[i + 1]] for i in order.tolist()]) if len(order) else embeds

    empty = load_file(os.path.join(folder, EMPTY))
    return LatentCache(
        indices=indices[order],
        unreadable=torch.sort(torch.cat([s["unreadable"] for s in shards])).values,
        latent_mean=_load_latents(shards, "latent_mean", order),
        latent_std=_load_latents(shards, "latent_std", order),
        text_embeds=variants_in_row_order("text_embeds"),
        caption_offsets=torch.cat([torch.zeros(1, dtype=torch.long), counts[order].cumsum(0)]),
        empty_embed=empty["empty_embed"],
        original_size=torch.cat([s["original_size"] for s in shards])[order],
        crop_top_left=torch.cat([s["crop_top_left"] for s in shards])[order],
        pooled_embeds=variants_in_row_order("pooled_embeds"),
        empty_pooled=empty.get("empty_pooled"),
    )


def _load_latents(shards: list[dict], name: str, order: torch.Tensor) -> Union[torch.Tensor, list]:
    """One (N, S, C, h, w) tensor in `order`, or for bucketed shards a list of per-row (S, C, h, w) tensors."""
    if "latent_shapes" not in shards[0]:
        return torch.cat([s[name] for s in shards])[order]
    rows = []
    for shard in shards:
        shapes = [tuple(shape) for shape in shard["latent_shapes"].tolist()]
        rows += [flat.view(shape) for flat, shape in zip(shard[name].split([math.prod(s) for s in shapes]), shapes)]
    return [rows[i] for i in order.tolist()]


def _encode_rows(dataset, rows, vae, encoders: dict, transform, image_column, caption_column,
                 batch_size, progress) -> dict[str, torch.Tensor]:
    fixed_crop = dataclasses.replace(transform, random_flip=False)  # ImageTransform, or a BucketTransform
    bucketed = hasattr(transform, "buckets")
    num_sides = 2 if transform.random_flip else 1  # [unflipped, flipped] only when training flips
    kept, unreadable, means, stds, counts, sizes, crops = [], [], [], [], [], [], []
    texts: dict[str, list[torch.Tensor]] = {}
    rows = list(rows)
    for start in range(0, len(rows), batch_size):
        pixels, captions = [], []
        for index in rows[start:start + batch_size]:
            row = dataset[index]
            image = decode_image(row[image_column])
            if image is None:
                unreadable.append(index)
                continue
            variants = caption_variants(row[caption_column])
            pixels.append(fixed_crop(image, sample_generator(0, index, epoch=-1)))  # one crop per image
            sizes.append((image.height, image.width))
            crops.append(_crop_per_side(image.size, transform, sample_generator(0, index, epoch=-1), num_sides))
            captions.extend(variants)
            counts.append(len(variants))
            kept.append(index)
        if pixels:
            mean, std = _encode_same_sizes(vae, pixels, num_sides)  # b × (S, C, h, w), in row order
            means += mean
            stds += std
            for name, tensor in encode_caption_tensors(captions=captions, **encoders).items():
                texts.setdefault(name, []).append(tensor.cpu())  # (m, L, D) and, for SDXL, (m, P)
        if progress is not None:
            progress(len(rows[start:start + batch_size]))
    if not kept:  # an empty shard still has the right trailing shapes
        texts = {name: [t.cpu()[:0]] for name, t in encode_caption_tensors(captions=[""], **encoders).items()}
    latents = _pack_latents(means, stds, bucketed, _empty_latents(vae, transform.resolution, num_sides))
    return {
        "indices": torch.tensor(kept, dtype=torch.long),
        "unreadable": torch.tensor(unreadable, dtype=torch.long),
        **latents,
        **{name: torch.cat(parts).contiguous() for name, parts in texts.items()},
        "caption_counts": torch.tensor(counts, dtype=torch.long),
        "original_size": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
        "crop_top_left": torch.tensor(crops, dtype=torch.long).reshape(-1, num_sides, 2),
    }


def _crop_per_side(size: tuple[int, int], transform: ImageTransform, generator: torch.Generator,
                   num_sides: int) -> list[tuple[int, int]]:
    """(top, left) of the image's crop in its resized frame: as cropped, then (for S = 2) as mirrored."""
    resized_w, _, left, top = crop_box(size, transform.resolution, transform.center_crop, generator)
    mirrored_left = resized_w - left - transform.resolution  # the flipped image's crop starts this far from the left
    return [(top, left), (top, mirrored_left)][:num_sides]


def _encode_same_sizes(vae, pixels: list[torch.Tensor], num_sides: int) -> tuple[list, list]:
    """Encode images (3, H, W) in batches of equal size (buckets give several); per-row (S, C, h, w) moments."""
    means, stds = [None] * len(pixels), [None] * len(pixels)
    groups: dict[tuple, list[int]] = {}
    for position, image in enumerate(pixels):
        groups.setdefault(tuple(image.shape), []).append(position)
    for positions in groups.values():
        batch = torch.stack([pixels[p] for p in positions])  # (b, 3, H, W)
        sides = [batch, batch.flip(-1)][:num_sides]
        mean, std = encode_latent_moments(vae, torch.cat(sides))  # (S·b, C, h, w)
        mean = torch.stack(mean.float().cpu().chunk(num_sides), dim=1)  # (b, S, C, h, w)
        std = torch.stack(std.float().cpu().chunk(num_sides), dim=1)
        for k, p in enumerate(positions):
            means[p], stds[p] = mean[k], std[k]
    return means, stds


def _pack_latents(means: list, stds: list, bucketed: bool, empty: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row (S, C, h, w) moments as stacked (n, S, C, h, w) tensors, or flat with their shapes when bucketed."""
    if bucketed:
        shapes = torch.tensor([list(m.shape) for m in means], dtype=torch.long).reshape(-1, 4)
        flat = lambda xs: torch.cat([x.reshape(-1) for x in xs]) if xs else torch.zeros(0)  # noqa: E731
        return {"latent_mean": flat(means), "latent_std": flat(stds), "latent_shapes": shapes}
    if not means:
        return {"latent_mean": empty, "latent_std": empty.clone()}
    return {"latent_mean": torch.stack(means).contiguous(), "latent_std": torch.stack(stds).contiguous()}


def _empty_latents(vae, resolution: int, sides: int) -> torch.Tensor:
    factor = vae_scale_factor(vae)
    return torch.zeros(0, sides, vae.config.latent_channels, resolution // factor, resolution // factor)


def _save_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp))


# ----------------------------------------------------------------------------- training samples


class CachedSamples(torch.utils.data.Dataset):
    """Training samples from a cache: items (dataset index, epoch) -> latent moments and a text embedding.

    Per sample, a generator seeded by (seed, epoch, index) draws the flip and
    the caption variant (or the empty caption, with probability `caption_dropout`).
    `__getitems__` gathers a whole batch at once, so use it with `collate_fn=identity`.
    """

    def __init__(self, cache: LatentCache, random_flip: bool = False, caption_dropout: float = 0.0, seed: int = 0):
        if random_flip and _num_sides(cache) < 2:
            raise ValueError("random_flip: this cache holds no mirrored latents (it was built without random_flip)")
        self.cache, self.random_flip, self.caption_dropout, self.seed = cache, random_flip, caption_dropout, seed
        self.row_of = {int(index): row for row, index in enumerate(cache.indices.tolist())}

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, item):
        return self.__getitems__([item])

    def draw(self, index: int, epoch: int) -> tuple[int, int, int, Optional[int]]:
        """(cache row, side, first variant's embedding row, caption variant or None for the empty caption) of one
        sample, from its (seed, epoch, index) generator: the flip first, then the caption."""
        row = self.row_of[int(index)]
        generator = sample_generator(self.seed, index, epoch)
        side = int(draw_flip(generator, self.random_flip))
        first, last = self.cache.caption_offsets[row : row + 2].tolist()
        return row, side, first, pick_caption_index(last - first, generator, self.caption_dropout)

    def __getitems__(self, items) -> dict[str, torch.Tensor]:
        draws = [self.draw(index, epoch) for index, epoch in items]  # (row, side, first, choice) per sample
        rows, sides = [d[0] for d in draws], [d[1] for d in draws]
        rows_t, sides_t = torch.tensor(rows), torch.tensor(sides)
        batch = {
            "latent_mean": _gather_latents(self.cache.latent_mean, rows, sides),  # (B, C, h, w)
            "latent_std": _gather_latents(self.cache.latent_std, rows, sides),
            "index": torch.tensor([int(i) for i, _ in items]),
            "original_size": self.cache.original_size[rows_t],  # (B, 2) (height, width)
            "crop_top_left": self.cache.crop_top_left[rows_t, sides_t],  # (B, 2) (top, left) of the side drawn
        }
        batch.update(self.caption_fields(items, draws))
        return batch

    def caption_fields(self, items, draws) -> dict[str, torch.Tensor]:
        """The drawn caption variants' cached "text_embeds" (B, L, D), and SDXL's "pooled_embeds" (B, P)."""
        cache = self.cache

        def pick(table: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
            return torch.stack([empty if choice is None else table[first + choice] for _, _, first, choice in draws])

        fields = {"text_embeds": pick(cache.text_embeds, cache.empty_embed)}
        if cache.pooled_embeds is not None:
            fields["pooled_embeds"] = pick(cache.pooled_embeds, cache.empty_pooled)
        return fields


class CaptionedCachedSamples(CachedSamples):
    """Cached latents with each sample's caption text (the variant `CachedSamples` draws, "" when dropped) instead
    of its cached embeddings: for text encoders that train, whose embeddings change every step.

    `captions` maps a dataset row to its caption variants in the cache's order (the rows' `caption_variants`).
    """

    def __init__(self, cache: LatentCache, captions: dict[int, list[str]], random_flip: bool = False,
                 caption_dropout: float = 0.0, seed: int = 0):
        super().__init__(cache, random_flip, caption_dropout, seed)
        self.captions = captions

    def caption_fields(self, items, draws) -> dict[str, list[str]]:
        """The drawn caption variants' text ("" when dropped), to be encoded by the training encoders."""
        return {"caption": ["" if choice is None else self.captions[int(index)][choice]
                            for (index, _), (_, _, _, choice) in zip(items, draws)]}


def _num_sides(cache: LatentCache) -> int:
    """S: 2 when the cache holds mirrored latents, else 1 (an empty bucketed cache counts as either)."""
    if isinstance(cache.latent_mean, torch.Tensor):
        return cache.latent_mean.shape[1]
    return cache.latent_mean[0].shape[0] if cache.latent_mean else 2


def _gather_latents(latents: Union[torch.Tensor, list], rows: list[int], sides: list[int]) -> torch.Tensor:
    """(B, C, h, w) moments of the given rows and sides; bucketed rows of one batch share a size."""
    if isinstance(latents, torch.Tensor):
        return latents[torch.tensor(rows), torch.tensor(sides)]
    return torch.stack([latents[r][s] for r, s in zip(rows, sides)])


def identity(batch):
    """collate_fn for datasets whose `__getitems__` already returns a batch."""
    return batch
