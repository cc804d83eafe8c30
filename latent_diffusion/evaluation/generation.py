"""Generating an evaluation's images: every (setting, prompt, seed) not yet on disk, batch by batch, timed.

Each batch is one pipeline call on up to `batch_size` consecutive prompts with one seed, timed from the
call to its last image (text encoding, sampling and VAE decoding count; PNG writing does not), after one
untimed warm-up call. Its PNGs are written (with the metadata that reproduces them) before its timing
line, so an image whose PNG exists is never generated again. The pipeline is passed in: the library
never imports it, and any object with the `LatentDiffusionPipeline` call signature works.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from latent_diffusion.formats.pngmeta import save_png
from latent_diffusion.evaluation.prompts import EvalPrompt
from latent_diffusion.evaluation.resources import PeakMemory
from latent_diffusion.evaluation.run_folder import EvalRun, image_seed
from latent_diffusion.evaluation.settings import Setting
from latent_diffusion.evaluation.timings import append_timing
from latent_diffusion.settings import GenerationSettings, batch_pipeline_kwargs


def image_settings(run: EvalRun, setting: Setting, prompt: EvalPrompt, seed: int) -> GenerationSettings:
    """The settings of one evaluation image, as `latent-diffusion generate` would take them to make it again."""
    return GenerationSettings(prompt=prompt.text, steps=setting.steps, guidance=setting.guidance,
                              sampler=setting.sampler, seed=image_seed(prompt.index, seed), height=run.height,
                              width=run.width, model=run.model)


def _call_pipeline(pipe, run: EvalRun, setting: Setting, items: Sequence[tuple[EvalPrompt, int]], steps=None):
    requests = [image_settings(run, setting, p, s).replace(steps=steps or setting.steps) for p, s in items]
    kwargs = batch_pipeline_kwargs(requests)
    return pipe(kwargs.pop("prompt"), **kwargs).images  # the prompts by position, as stand-in pipelines take them


def png_metadata(run: EvalRun, setting: Setting, prompt: EvalPrompt, seed: int) -> dict[str, str]:
    """What an evaluation PNG records: the generation's settings (as `generate` writes them) and its place in
    the evaluation."""
    return {**image_settings(run, setting, prompt, seed).png_metadata(), "eval_prompt_index": str(prompt.index),
            "eval_seed": str(seed)}


def generate_batch(pipe, run: EvalRun, setting: Setting, items: Sequence[tuple[EvalPrompt, int]]) -> None:
    """Generate, time and save one batch; its images are written before its timing line."""
    device = torch.device(getattr(pipe, "device", "cpu"))
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        images = _call_pipeline(pipe, run, setting, items)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    files = []
    for image, (prompt, seed) in zip(images, items):
        path = save_png(image, run.image_path(setting, prompt, seed), png_metadata(run, setting, prompt, seed))
        files.append(path.name)
    append_timing(run.setting_dir(setting), dict(
        files=files, seconds=seconds, peak_bytes=int(memory.peak), peak_increase_bytes=int(memory.increase),
        memory_kind=memory.kind, device=str(device), torch_threads=torch.get_num_threads(), batch_size=len(items)))


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def generate_missing(pipe, run: EvalRun, progress: bool = True) -> int:
    """Generate every image not yet on disk (one tqdm bar over the whole run); returns how many were made."""
    from tqdm.auto import tqdm

    todo = {setting: run.pending(setting) for setting in run.settings}
    total = len(run.settings) * len(run.items())
    remaining = sum(map(len, todo.values()))
    with tqdm(total=total, initial=total - remaining, desc="eval: generating", unit="image",
              disable=not progress) as bar:
        if remaining:
            first = next(s for s, items in todo.items() if items)
            _call_pipeline(pipe, run, first, todo[first][: run.batch_size], steps=1)  # untimed warm-up
        for setting, items in todo.items():
            for batch in _batches(items, run.batch_size):
                bar.set_postfix_str(setting.label)
                generate_batch(pipe, run, setting, batch)
                bar.update(len(batch))
    return remaining
