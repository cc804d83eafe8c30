"""Which samples each process trains on, step by step: a pure function of (seed, epoch, rank), so resuming is exact.

Each epoch shuffles the usable dataset rows with a generator seeded by
(seed, epoch), drops the tail that does not fill a step on every process, and
deals rows out round-robin (rank::world_size), so processes see disjoint
rows. Batch items are (row, epoch) pairs; the datasets seed each sample's own
random choices from them (see `latent_diffusion.training.data.sample_generator`).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


def steps_per_epoch(num_rows: int, *, world_size: int, batch_size: int, accumulation: int) -> int:
    """Optimizer steps one epoch gives; each takes `accumulation` batches of `batch_size` rows on every process."""
    return num_rows // (world_size * batch_size * accumulation)


def epoch_batches(rows: Sequence[int], *, epoch: int, seed: int, rank: int, world_size: int, batch_size: int,
                  accumulation: int) -> list[list[tuple[int, int]]]:
    """This process's batches of one epoch, in order: lists of (row, epoch)."""
    steps = steps_per_epoch(len(rows), world_size=world_size, batch_size=batch_size, accumulation=accumulation)
    used = steps * world_size * batch_size * accumulation
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    mine = [int(rows[i]) for i in order[:used].tolist()][rank::world_size]
    return [[(row, epoch) for row in mine[b : b + batch_size]] for b in range(0, len(mine), batch_size)]


def step_groups(loader, accumulation: int) -> Iterator[list]:
    """Group a loader's batches into the `accumulation` micro-batches of each optimizer step."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accumulation:
            yield group
            group = []
