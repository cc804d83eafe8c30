"""Validation during training: sample the validation prompts, save a grid PNG, log images and metrics.

Metrics are plain functions `fn(images, prompts) -> dict[str, float]` kept in
`VALIDATION_METRICS` by name and chosen with `--validation_metrics NAME ...`:
"pixel_std" (flags collapsed samples) and "shapes_adherence" (the Shapes judge's
accuracy on validation prompts in the Shapes grammar; use Shapes prompts, e.g.
from `latent_diffusion.shapes.evaluation_prompts`).
Register your own with the decorator:

    from latent_diffusion.training.validation import register_validation_metric

    @register_validation_metric("mean_brightness")
    def mean_brightness(images, prompts):
        return {"brightness": ...}
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

MetricFn = Callable[[Sequence[Image.Image], Sequence[str]], dict]
VALIDATION_METRICS: dict[str, MetricFn] = {}


def register_validation_metric(name: str):
    """Decorator adding `fn(images, prompts) -> dict` to the registry under `name`."""

    def register(fn: MetricFn) -> MetricFn:
        VALIDATION_METRICS[name] = fn
        return fn

    return register


@register_validation_metric("pixel_std")
def pixel_std(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """Mean per-image pixel standard deviation in [0, 1]: near 0 flags collapsed, flat samples."""
    return {"pixel_std": float(np.mean([np.asarray(im, dtype=np.float32).std() / 255.0 for im in images]))}


@register_validation_metric("shapes_adherence")
def shapes_adherence(images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """Shapes adherence of the images whose prompt parses in the Shapes grammar (others are skipped):
    {"adherence": overall, "adherence_<category>": ..., "adherence_held_out": ...}, each the fraction judged
    exactly as prompted by `latent_diffusion.shapes.score_images`; categories without prompts are left out."""
    from latent_diffusion.evaluation.scoring import shapes_adherence as adherence

    return adherence(images, prompts)


def compute_metrics(names: Sequence[str], images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """Run the named metrics and merge their dicts, each key prefixed by 'validation/'."""
    metrics = {}
    for name in names:
        for key, value in VALIDATION_METRICS[name](images, prompts).items():
            metrics[f"validation/{key}"] = float(value)
    return metrics


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equal-sized images row by row into one image."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


@torch.no_grad()
def run_validation(pipeline, prompts: Sequence[str], *, step: int, output_dir: str, seed: int,
                   num_inference_steps: int, guidance_scale: float, resolution: int,
                   metric_names: Sequence[str] = (), trackers=(), call_kwargs: Sequence[dict] = ()) -> tuple[str, dict]:
    """Sample one image per prompt (seeded), save `validation/step-N.png`, log to trackers; return (path, metrics).

    `call_kwargs`: per prompt, extra keywords for the pipeline call (a ControlNet's `control_image`)."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for i, prompt in enumerate(prompts):  # one generator per prompt: the grid does not depend on the prompt count
        generator = torch.Generator().manual_seed(seed + i)
        extra = call_kwargs[i] if call_kwargs else {}
        images += pipeline(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           generator=generator, height=resolution, width=resolution, output_type="pil",
                           **extra).images
    grid = image_grid(images)
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    grid.save(path)
    metrics = compute_metrics(metric_names, images, prompts)
    for tracker in trackers:
        log_images(tracker, images, prompts, step)
        if metrics:
            tracker.log(metrics, step=step)
    return path, metrics


def log_images(tracker, images: Sequence[Image.Image], prompts: Sequence[str], step: int) -> None:
    """Images to a tracker: TensorBoard gets an NHWC batch; other trackers get what their `log_images` takes."""
    arrays = np.stack([np.asarray(im) for im in images])  # (N, H, W, 3) uint8
    if tracker.name == "tensorboard":
        tracker.writer.add_images("validation", arrays, step, dataformats="NHWC")
    elif hasattr(tracker, "log_images"):
        tracker.log_images({"validation": arrays}, step=step)
