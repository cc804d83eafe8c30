"""Evaluation prompt sets for the Shapes world: what `latent-diffusion eval` asks the model to draw.

`evaluation_prompts(num, seed)` draws prompts the way training captions are
drawn (a scene from the sampler, then each optional part kept with
probability 0.5), but balanced over five kinds taken in turn, so that every
scoring category is covered once num >= 5:

    0 single      one object, no position phrase
    1 position    one object with a position phrase
    2 two_objects two objects with a relation
    3 background  any scene whose prompt keeps its background phrase
    4 held_out    a scene of the "heldout" split (at least one held-out pair)

Kinds 0-3 use only training colour-shape pairs. Each prompt comes with its
categories (`PromptSpec.categories`), which overlap: a prompt of kind 1 with
a background phrase is ("single", "position", "background"); held-out
prompts carry "held_out" and are reported apart by `score_images`. Prompts
may repeat, as captions do; the list is the same for the same seed.
"""
from __future__ import annotations

import numpy as np

from latent_diffusion.shapes.captions import PromptSpec, drop_optional_parts, format_prompt, spec_from_scene
from latent_diffusion.shapes.world import sample_scene

PROMPT_KINDS: tuple[str, ...] = ("single", "position", "two_objects", "background", "held_out")


def _fits(kind: str, spec: PromptSpec) -> bool:
    """Whether a drawn training prompt is of the wanted kind."""
    if kind == "single":
        return len(spec.objects) == 1 and spec.position is None
    if kind == "position":
        return spec.position is not None
    if kind == "two_objects":
        return spec.relation is not None
    return spec.background is not None  # "background"


def sample_prompt(rng: np.random.Generator, kind: str) -> PromptSpec:
    """One prompt of the given kind (one of PROMPT_KINDS), drawn like a training caption."""
    if kind not in PROMPT_KINDS:
        raise ValueError(f"kind must be one of {PROMPT_KINDS}; got {kind!r}")
    split = "heldout" if kind == "held_out" else "train"
    while True:
        spec = drop_optional_parts(spec_from_scene(sample_scene(rng, split)), rng)
        if kind == "held_out" or _fits(kind, spec):
            return spec


def evaluation_prompts(num: int, seed: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """`num` (prompt, categories) pairs cycling through PROMPT_KINDS; held-out prompts carry "held_out"."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int; got {num!r}")
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(num):
        spec = sample_prompt(rng, PROMPT_KINDS[i % len(PROMPT_KINDS)])
        prompts.append((format_prompt(spec), spec.categories))
    return prompts
