"""What a training run may ask for, checked before any work starts (issue 30).

A flag value the parser accepts can still end a run minutes in with an allocator traceback or a write error
naming a temporary file: `--resolution 8192` (the VAE encodes 8192² images while caching), a
`--train_batch_size` no memory holds, 20000-character `--validation_prompts` (refused only at the first
validation, after training), an `--output_dir` under `/proc` or naming a file, a `--unet_config` that is not
JSON. Each is refused here, in one line naming its flag.

The memory of a training step reuses `latent_diffusion/limits.py`'s estimates of the UNet forward and the
VAE decoder (the encoder mirrors it), not a second formula:

    peak ≈ max(batch · UNet forward · TRAIN_BACKWARD,  batch · VAE encode,  one validation call) + batch's pixels

TRAIN_BACKWARD: autograd keeps the forward's activations for the backward pass and the backward adds their
gradients. Measured on the 2-core CPU box with the tiny UNet (`latent_diffusion/tiny.py`), batch 1, by
`python benchmarks/bench_train_memory.py`: forward + backward at latent 128² and 256² grew the peak resident
memory 3.64× and 3.67× the forward estimate (the forward alone: 0.89× and 0.45×). It was not measured on a GPU
nor with SD-sized UNets. With `--gradient_checkpointing` only the block being recomputed keeps its
activations, so the factor is 1. Like limits.py's, it guards against runs that cannot fit; it is not a
byte-exact prediction.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from latent_diffusion.checks import MAX_IMAGE_SIDE
from latent_diffusion.formats.atomic import cannot_create_files_in
from latent_diffusion.limits import (GIB, MAX_IMAGES_PER_CALL, check_model_config, check_prompt_length,
                                     estimate_call_memory, memory_budget, unet_activation_elements,
                                     vae_decode_elements)

TRAIN_BACKWARD = 4  # forward activations kept for the backward plus their gradients (3.6–3.7× measured, see above)
MAX_VALIDATION_PROMPTS = MAX_IMAGES_PER_CALL  # one grid of images; more is a file pasted by mistake
MAX_CONFIG_BYTES = 1 << 20  # a UNet config is a few KB of JSON
TORCH_MAX_SEED = 2 ** 64 - 1  # torch.Generator.manual_seed takes at most this


# ----------------------------------------------------------------------------- flags (parse time)


def output_dir_problems(output_dir: str) -> list[str]:
    """--output_dir must be a folder, or a path whose nearest existing parent is a folder files can be made in."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        return [f"--output_dir {output_dir!r} is a file; give a folder (it is created when missing)"]
    existing = path if path.is_dir() else next((p for p in path.absolute().parents if p.exists()), Path("/"))
    if not existing.is_dir():
        return [f"--output_dir {output_dir!r}: {str(existing)!r} is a file, not a folder"]
    reason = cannot_create_files_in(str(existing))
    if reason:
        return [f"--output_dir {output_dir!r} cannot be written: no file can be created in {str(existing)!r} ({reason})"]
    return []


def read_unet_config(path: str) -> dict:
    """The JSON object of a --unet_config file; ValueError naming the flag for anything else (a pickle, a list,
    sizes no machine holds). The file is read as text, never unpickled."""
    if not os.path.isfile(path):
        raise ValueError(f"--unet_config {path!r} is not a file")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise ValueError(f"--unet_config {path!r} is {os.path.getsize(path)} bytes; a UNet config is a JSON "
                         f"object of at most {MAX_CONFIG_BYTES} bytes")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = str(error).splitlines()[0][:200] if not isinstance(error, RecursionError) else "nested too deeply"
        raise ValueError(f"--unet_config {path!r} is not a JSON file ({reason})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--unet_config {path!r} must hold a JSON object, got {type(config).__name__}")
    check_model_config(config, f"--unet_config {path!r}", max_sample_size=MAX_IMAGE_SIDE // 8)
    return config


def build_unet(path: str):
    """A fresh UNet2DConditionModel from a --unet_config file; what diffusers refuses is one line naming the flag."""
    from diffusers import UNet2DConditionModel

    config = read_unet_config(path)
    try:
        return UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ValueError(f"--unet_config {path!r}: diffusers cannot build a UNet from it ({first})") from None


def max_workers() -> int:
    """The most data-loader worker processes a run may start: each is a whole Python process."""
    return max(64, 2 * (os.cpu_count() or 1))


def flag_problems(args) -> list[str]:
    """Problems of --output_dir, --unet_config, --seed, --dataloader_num_workers and --validation_prompts (parse
    time: no model, no data)."""
    problems = output_dir_problems(args.output_dir)
    if args.unet_config is not None:
        try:
            read_unet_config(args.unet_config)
        except ValueError as error:
            problems.append(str(error))
    prompts = args.validation_prompts or []
    highest_seed = TORCH_MAX_SEED - max(len(prompts) - 1, 0)  # validation prompt i samples with seed + i
    if not 0 <= args.seed <= highest_seed:  # torch.manual_seed raises an overflow deep in the run otherwise
        problems.append(f"--seed must be an integer >= 0 and <= {highest_seed}, got {args.seed}")
    if args.dataloader_num_workers > max_workers():
        problems.append(f"--dataloader_num_workers must be at most {max_workers()} (twice this machine's "
                        f"{os.cpu_count()} CPUs, or 64), got {args.dataloader_num_workers}")
    if len(prompts) > MAX_VALIDATION_PROMPTS:
        problems.append(f"--validation_prompts: at most {MAX_VALIDATION_PROMPTS} prompts, got {len(prompts)}")
    try:
        check_prompt_length("--validation_prompts", prompts)  # the pipeline's own limit, before training
    except ValueError as error:
        problems.append(str(error))
    return problems


@contextlib.contextmanager
def naming_output_dir(output_dir: str) -> Iterator[None]:
    """An OSError while writing the run's output becomes one line naming --output_dir (status 1), not the
    temporary file it happened in."""
    try:
        yield
    except OSError as error:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        raise OSError(f"--output_dir {output_dir!r}: could not write the run's output: "
                      f"{error.strerror or error}{where}") from None


# ----------------------------------------------------------------------------- memory (once the configs are known)


def estimate_step_memory(unet_config: Any, vae_config: Any, *, batch: int, resolution: int, vae_factor: int,
                         dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
                         validation: bool = False) -> int:
    """Bytes a training step's peak needs (see the module docstring): activations for the backward, the VAE
    encoding a batch (caching or on the fly), a validation call at `resolution`, plus the batch's float pixels."""
    item = torch.tensor([], dtype=dtype).element_size()
    latent = resolution // vae_factor
    backward = 1 if gradient_checkpointing else TRAIN_BACKWARD
    unet = batch * backward * unet_activation_elements(unet_config, latent, latent) * item
    vae = batch * vae_decode_elements(vae_config, resolution, resolution) * item
    sample = estimate_call_memory(unet_config, vae_config, 1, resolution, resolution, True, vae_factor, dtype) \
        if validation else 0
    return max(unet, vae, sample) + batch * 3 * resolution * resolution * 4


def check_step_memory(settings, unet_config: Any, vae_config: Any, vae_factor: int, dtype: torch.dtype,
                      device: Any = "cpu", budget: Optional[int] = None) -> int:
    """ValueError naming --resolution or --train_batch_size when a step's estimated memory exceeds the budget
    (`memory_budget(device)`: free device memory, or LATENT_DIFFUSION_MEMORY_GIB). Returns the estimate."""
    batch, resolution = settings.optim.train_batch_size, settings.data.resolution
    options = dict(resolution=resolution, vae_factor=vae_factor, dtype=dtype,
                   gradient_checkpointing=settings.optim.gradient_checkpointing,
                   validation=bool(settings.validation.validation_prompts))
    need = estimate_step_memory(unet_config, vae_config, batch=batch, **options)
    budget = memory_budget(device) if budget is None else budget
    if need > budget:
        one = estimate_step_memory(unet_config, vae_config, batch=1, **options)
        culprit = f"--resolution {resolution}" if one > budget else f"--train_batch_size {batch}"
        raise ValueError(f"{culprit} needs about {need / GIB:.3g} GiB per training step for this model, more than "
                         f"the {budget / GIB:.3g} GiB available; use a smaller --resolution or --train_batch_size "
                         "(or --gradient_checkpointing)")
    return need


def check_model_dependent_flags(settings, unet_config: Any, scheduler_config: Any) -> None:
    """ValueError naming the flag for values only the loaded model can judge, before they cost memory or a
    whole run: a --lora_rank above 4 × the UNet's widest channels (no adapted layer, the 4×-wide feed-forward
    included, is wider: a higher rank adds parameters, not capacity) and --num_validation_inference_steps
    above the scheduler's training timesteps (the pipeline would refuse them at the first validation)."""
    widest = 4 * max(int(c) for c in unet_config.block_out_channels)
    if settings.lora is not None and settings.lora.rank > widest:
        raise ValueError(f"--lora_rank must be at most {widest} for this UNet (4 × its widest "
                         f"{widest // 4} channels), got {settings.lora.rank}")
    timesteps = getattr(scheduler_config, "num_train_timesteps", None)
    steps = settings.validation.num_validation_inference_steps
    if settings.validation.validation_prompts and timesteps and steps > timesteps:
        raise ValueError(f"--num_validation_inference_steps must be at most {timesteps} (the scheduler's "
                         f"num_train_timesteps), got {steps}")
