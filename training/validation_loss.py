"""Held-out validation loss (`--validation_split F`): the denoising loss on rows kept out of training, with the
same timesteps, noise and latent draws at every evaluation, so its curve shows overfitting without images.

A seeded fraction F of the usable rows (at least one) is held out. Every `--validation_steps` the main process
runs the (EMA, if on) UNet over them in evaluation mode: held-out batch k always draws its t, ε and z_0 from the
generator seeded (seed, k), and its samples (crop, flip, caption) come from epoch 0, so the only thing that
changes between evaluations is the model. The mean is logged as `val/loss`.
"""
from __future__ import annotations

from functools import partial

import torch


def add_validation_loss_args(g) -> None:
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="hold out this fraction of the images (e.g. 0.05) and log their loss every "
                        "--validation_steps as val/loss")


def check_validation_loss_args(args) -> list[str]:
    if not 0.0 <= args.validation_split < 1.0:
        return [f"--validation_split must be in [0, 1), got {args.validation_split}"]
    return []


def split_rows(rows: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): a seeded choice of max(1, round(fraction · n)) rows when fraction > 0."""
    if fraction <= 0:
        return rows, []
    count = max(1, round(fraction * len(rows)))
    if count >= len(rows):
        raise ValueError(f"--validation_split {fraction} would hold out all {len(rows)} usable image(s); "
                         "lower it or add images")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(int(seed) + 1)).tolist()
    held = set(order[:count])
    return [r for k, r in enumerate(rows) if k not in held], [rows[k] for k in sorted(held)]


def held_out_batches(rows: list[int], batch_size: int) -> list[list[tuple[int, int]]]:
    """The held-out rows as batches of (row, epoch 0) items."""
    return [[(row, 0) for row in rows[i:i + batch_size]] for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def held_out_loss(loss_of_batch, samples, rows: list[int], batch_size: int, collate_fn, seed: int) -> float:
    """Mean loss over the held-out rows; `loss_of_batch(batch, generator)` gives one batch's mean loss (0-d)."""
    loader = torch.utils.data.DataLoader(samples, batch_sampler=held_out_batches(rows, batch_size),
                                         collate_fn=collate_fn)
    total, count = 0.0, 0
    for k, batch in enumerate(loader):
        generator = torch.Generator().manual_seed(hash((int(seed), k, 17)) & 0x7FFF_FFFF_FFFF_FFFF)
        size = len(batch["index"])
        total += float(loss_of_batch(batch, generator)) * size
        count += size
    return total / count


def loss_of_batch(batch_inputs, denoising_loss, unet, models, loss_fn, device, resolution, batch, generator):
    """One held-out batch's loss as training computes it (prior weights and masks included)."""
    latents, cond = batch_inputs(batch, models, device, generator, resolution)
    return denoising_loss(unet, latents, cond, loss_fn, generator, batch.get("loss_weight"), batch.get("loss_mask"))


def bind(batch_inputs, denoising_loss, unet, models, loss_fn, device, resolution):
    """`loss_of_batch` with the run's pieces bound: (batch, generator) -> loss."""
    return partial(loss_of_batch, batch_inputs, denoising_loss, unet, models, loss_fn, device, resolution)
