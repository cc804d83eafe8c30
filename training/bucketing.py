"""Aspect-ratio bucketing in training: flags, each row's bucket, and batches that each come from one bucket.

`--enable_bucket` (kohya's names: `--min_bucket_reso`, `--max_bucket_reso`,
`--bucket_reso_steps`) trains every image at the size of its bucket
(`latent_diffusion.training.buckets`) instead of a square crop. The batch plan stays a
pure function of (seed, epoch, rank), like `batches.epoch_batches`, so
resuming mid-epoch is exact: each epoch shuffles every bucket's rows with a
generator seeded by (seed, epoch), cuts each bucket into global batches of
processes × batch size rows (a bucket's tail that cannot fill one is dropped
for that epoch), shuffles the global batches, keeps whole optimizer steps, and
gives each process its `rank::world_size` share of every global batch, so
all processes train the same bucket at each micro-step.
"""
from __future__ import annotations

import argparse
from collections import Counter
from typing import Optional, Sequence

import torch

from latent_diffusion.training.buckets import BucketTransform, make_buckets
from latent_diffusion.vae import latent_size_multiple, vae_scale_factor
from latent_diffusion.training.data import decode_image
from latent_diffusion.training.settings import BucketSettings

Bucket = tuple[int, int]  # (width, height)


def add_bucket_args(g) -> None:
    g.add_argument("--enable_bucket", action="store_true",
                   help="aspect-ratio bucketing: train each image at the bucket size nearest its aspect ratio "
                        "(about --resolution² pixels), centre-cropped, one bucket per batch")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side in pixels")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side in pixels")
    g.add_argument("--bucket_reso_steps", type=int, default=64,
                   help="bucket sides are multiples of this (itself a multiple of the VAE × UNet factor)")


def check_bucket_args(args: argparse.Namespace) -> list[str]:
    """Problems with the bucket flags that need no model, each naming its flag."""
    if not args.enable_bucket:
        return []
    problems = [f"--{flag} must be >= 1, got {getattr(args, flag)}"
                for flag in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps") if getattr(args, flag) < 1]
    if problems:
        return problems
    if args.min_bucket_reso > args.max_bucket_reso:
        problems.append(f"--min_bucket_reso {args.min_bucket_reso} must be <= --max_bucket_reso {args.max_bucket_reso}")
    for flag in ("min_bucket_reso", "max_bucket_reso"):
        if getattr(args, flag) % args.bucket_reso_steps:
            problems.append(f"--{flag} {getattr(args, flag)} must be a multiple of --bucket_reso_steps "
                            f"{args.bucket_reso_steps}")
    return problems


def bucket_transform(bucket: BucketSettings, resolution: int, random_flip: bool, vae, unet) -> BucketTransform:
    """The image transform of a bucketed run; --bucket_reso_steps must fit the VAE and the UNet's downsampling."""
    multiple = latent_size_multiple(vae, unet)
    if bucket.bucket_reso_steps % multiple:
        raise ValueError(f"--bucket_reso_steps {bucket.bucket_reso_steps} must be a multiple of {multiple} "
                         f"(VAE factor {vae_scale_factor(vae)} × the UNet's downsampling)")
    buckets = make_buckets(resolution, bucket.min_bucket_reso, bucket.max_bucket_reso, bucket.bucket_reso_steps)
    return BucketTransform(tuple(buckets), resolution, random_flip)


def cache_setting(bucket: Optional[BucketSettings], resolution: int) -> Optional[list[int]]:
    """What the latent cache key records about bucketing (None without it, so square caches keep their keys)."""
    if bucket is None:
        return None
    return [resolution, bucket.min_bucket_reso, bucket.max_bucket_reso, bucket.bucket_reso_steps]


def buckets_from_cache(cache, factor: int) -> dict[int, Bucket]:
    """Row -> bucket (width, height) read off the cached latents' sizes (h, w) × the VAE factor."""
    return {int(row): (int(m.shape[-1]) * factor, int(m.shape[-2]) * factor)
            for row, m in zip(cache.indices.tolist(), cache.latent_mean)}


def buckets_from_images(dataset, image_column: str, rows: Sequence[int], transform: BucketTransform) -> dict[int, Bucket]:
    """Row -> bucket, by reading each image's size (the on-the-fly path)."""
    column = dataset.select_columns([image_column])
    return {int(row): transform.bucket_of(decode_image(column[int(row)][image_column])) for row in rows}


def describe_buckets(row_buckets: dict[int, Bucket]) -> str:
    """'W×H: n' for every used bucket, largest first."""
    counts = Counter(row_buckets.values())
    return ", ".join(f"{w}×{h}: {n}" for (w, h), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def bucket_global_batches(row_buckets: dict[int, Bucket], *, epoch: int, seed: int, span: int) -> list[list[int]]:
    """One epoch's global batches of `span` rows, each from one bucket, in training order."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    by_bucket: dict[Bucket, list[int]] = {}
    for row in sorted(row_buckets):
        by_bucket.setdefault(row_buckets[row], []).append(row)
    batches = []
    for bucket in sorted(by_bucket):
        rows = by_bucket[bucket]
        shuffled = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        batches += [shuffled[b:b + span] for b in range(0, len(shuffled) - span + 1, span)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def bucket_steps_per_epoch(row_buckets: dict[int, Bucket], *, world_size: int, batch_size: int,
                           accumulation: int) -> int:
    """Optimizer steps of one epoch: whole global batches per bucket, grouped by `accumulation`."""
    span = world_size * batch_size
    return sum(n // span for n in Counter(row_buckets.values()).values()) // accumulation


def bucket_epoch_batches(row_buckets: dict[int, Bucket], rows: Sequence[int], *, epoch: int, seed: int, rank: int,
                         world_size: int, batch_size: int, accumulation: int) -> list[list[tuple[int, int]]]:
    """This process's batches of one epoch over `rows`, in order: lists of (row, epoch), each from one bucket."""
    row_buckets = {int(row): row_buckets[int(row)] for row in rows}
    steps = bucket_steps_per_epoch(row_buckets, world_size=world_size, batch_size=batch_size,
                                   accumulation=accumulation)
    batches = bucket_global_batches(row_buckets, epoch=epoch, seed=seed, span=world_size * batch_size)
    return [[(row, epoch) for row in batch[rank::world_size]] for batch in batches[: steps * accumulation]]


def row_buckets_for(data_cache, dataset, image_column: str, rows, transform, vae) -> dict[int, Bucket]:
    """Each usable row's bucket: from the cache when there is one, else from the images."""
    if data_cache is not None:
        return buckets_from_cache(data_cache, vae_scale_factor(vae))
    return buckets_from_images(dataset, image_column, rows, transform)

