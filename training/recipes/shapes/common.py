"""Pieces shared by the Shapes recipe's stage 0 (text) and stage 1 (VAE) scripts.

* `shapes_batch(seed, step, ...)`: batch `step` of an endless Shapes stream, a
  pure function of (seed, step), so a resumed run sees exactly the batches it
  would have seen;
* `add_loop_arguments`, `train_stage`: the flags every stage has, and
  `train_resumable` run with them: checkpoints (safetensors) go to
  OUTPUT_DIR/checkpoints every `--checkpointing_steps`, and rerunning the same
  command resumes from the latest;
* `train_resumable`: the one training loop of both stages: resume from the
  latest checkpoint, then per step the learning rate, the step's RNG seed, the
  stage's loss, a clipped AdamW step, and a checkpoint every
  `checkpointing_steps` (and at the end, and where `--stop_after_steps` pauses);
* `RunCheckpoints`: `run_dir/checkpoint-N/` folders, named, listed, pruned and
  found ("latest") by `latent_diffusion.training.checkpointing` as the UNet's
  are, each holding the weights (`model.safetensors`), the optimizer state
  (`optimizer.safetensors`, its tensors flattened, its hyper-parameters in the
  metadata) and `state.json` (step, compute seconds so far, the last logged
  values), written as one folder and renamed into place, so a run killed at
  any moment resumes from its last whole checkpoint;
* `warmup_cosine_lr`: the learning rate as a function of the step (no
  scheduler state to save);
* `seed_everything_for_step`: torch's global RNG seeded from (seed, step).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from latent_diffusion.formats.atomic import atomic_folder, write_text_atomic
from latent_diffusion.shapes import caption, full_caption, render_array, sample_scene
from latent_diffusion.training.checkpointing import list_checkpoints, prune_checkpoints, resolve_checkpoint

STATE_FILE = "state.json"

# ---------------------------------------------------------------- data


@dataclass
class ShapesBatch:
    pixels: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    captions: list[str]  # training captions (optional parts dropped at random)
    full_captions: list[str]  # every optional part kept


def shapes_batch(seed: int, step: int, batch_size: int, size: int = 64, split: str = "train") -> ShapesBatch:
    """Batch `step` of the (seed, split) Shapes stream: a pure function of its arguments."""
    rng = np.random.default_rng((seed, step))
    scenes = [sample_scene(rng, split) for _ in range(batch_size)]
    arrays = np.stack([render_array(s, size) for s in scenes])  # (B, S, S, 3) uint8
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, S, S)
    captions = [caption(s, rng) for s in scenes]
    return ShapesBatch(pixels, captions, [full_caption(s) for s in scenes])


def to_uint8_images(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------- optimisation


def warmup_cosine_lr(step: int, max_steps: int, base_lr: float, warmup_steps: int, final_ratio: float = 0.1) -> float:
    """Linear warm-up to base_lr, then a cosine decay to final_ratio · base_lr at max_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return base_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + np.cos(np.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def seed_everything_for_step(seed: int, step: int) -> None:
    """Seed torch's global RNG from (seed, step), so a resumed step draws the same noise."""
    torch.manual_seed(int(np.random.default_rng((seed, step, 7)).integers(2**62)))


# ---------------------------------------------------------------- checkpoints


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer's state dict into safetensors tensors plus JSON metadata (its param groups)."""
    state = optimizer.state_dict()
    tensors = {}
    for param_id, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{param_id}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class RunCheckpoints:
    """Resumable checkpoints of one model and its optimizer under `run_dir`, named as `checkpointing.py` names
    the UNet's (`checkpoint-N`), without accelerate: the stages run in one plain process."""

    def __init__(self, run_dir: os.PathLike, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def list(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return [Path(p) for p in list_checkpoints(str(self.run_dir), STATE_FILE)]

    def latest(self) -> Optional[Path]:
        latest = resolve_checkpoint(str(self.run_dir), "latest", STATE_FILE)
        return Path(latest) if latest is not None else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Write checkpoint-<state['step']> (weights, optimizer, state.json) as one folder; keep the newest `keep`."""
        final = self.run_dir / f"checkpoint-{state['step']}"
        with atomic_folder(final) as tmp:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(tmp / "model.safetensors"))
            tensors, meta = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        prune_checkpoints(str(self.run_dir), self.keep, STATE_FILE)
        return final

    def load(self, path: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Restore weights (and optimizer state) from a checkpoint folder; return its state.json."""
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        if optimizer is not None:
            _load_optimizer(optimizer, path / "optimizer.safetensors")
        return json.loads((path / STATE_FILE).read_text())


class ComputeClock:
    """Seconds of compute spent on a stage, carried across resumes through the checkpoint state."""

    def __init__(self, already: float = 0.0):
        self.already = already
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.already + time.perf_counter() - self.started


# ---------------------------------------------------------------- the training loop


@dataclass(frozen=True)
class LoopSettings:
    """What the loop of a stage needs from its flags (`add_loop_arguments` defines them)."""

    seed: int
    max_train_steps: int
    learning_rate: float
    lr_warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    checkpointing_steps: int
    stop_after_steps: Optional[int] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LoopSettings":
        return cls(args.seed, args.max_train_steps, args.learning_rate, args.lr_warmup_steps, args.adam_weight_decay,
                   args.max_grad_norm, args.checkpointing_steps, args.stop_after_steps)


@dataclass(frozen=True)
class LoopResult:
    """Where a stage's training stands after one invocation."""

    step: int  # steps done (all invocations)
    max_train_steps: int
    compute_s: float  # compute seconds of the whole stage, summed over resumes

    @property
    def finished(self) -> bool:
        """False when --stop_after_steps paused the run before its last step."""
        return self.step >= self.max_train_steps


def add_loop_arguments(p: argparse.ArgumentParser, *, seed: int, train_batch_size: int, max_train_steps: int,
                       learning_rate: float, adam_weight_decay: float) -> None:
    """The flags every stage script has: its folder, threads, and `LoopSettings` (with the stage's defaults)."""
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=seed, help="training stream seed")
    p.add_argument("--train_batch_size", type=int, default=train_batch_size)
    p.add_argument("--max_train_steps", type=int, default=max_train_steps)
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--adam_weight_decay", type=float, default=adam_weight_decay)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--checkpointing_steps", type=int, default=250)
    p.add_argument("--num_threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--stop_after_steps", type=int, default=None,
                   help="end this invocation after that many steps (checkpointed; rerun to go on)")


def stage_output_dir(args: argparse.Namespace) -> Path:
    """Apply --num_threads and create --output_dir; returns it."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


StepLoss = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


def train_resumable(model: torch.nn.Module, checkpoints: RunCheckpoints, settings: LoopSettings,
                    step_loss: StepLoss, desc: str) -> LoopResult:
    """Train `model` with AdamW to `settings.max_train_steps`, resumed from the latest checkpoint.

    `step_loss(step)` computes the stage's loss on batch `step` (a pure function of the seed and the step) and
    the values to log; it runs after the step's learning rate is set and torch's RNG is seeded from
    (seed, step), so a resumed run takes exactly the steps an uninterrupted one would.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    done, compute = 0, 0.0
    latest = checkpoints.latest()
    if latest is not None:
        state = checkpoints.load(latest, model, optimizer)
        done, compute = state["step"], state["compute_s"]
        print(f"resumed from {latest} (step {done})", flush=True)
    clock = ComputeClock(compute)
    model.train()
    total = settings.max_train_steps
    progress = tqdm(range(done, total), initial=done, total=total, desc=desc, mininterval=10)
    for step in progress:
        set_lr(optimizer, warmup_cosine_lr(step, total, settings.learning_rate, settings.lr_warmup_steps))
        seed_everything_for_step(settings.seed, step)
        loss, logged = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        progress.set_postfix({k: f"{v:.4g}" for k, v in logged.items()}, refresh=False)
        done = step + 1
        pause = settings.stop_after_steps is not None and done >= settings.stop_after_steps
        if done % settings.checkpointing_steps == 0 or done == total or pause:
            checkpoints.save(model, optimizer, {"step": done, "compute_s": clock.seconds, **logged})
        if pause:
            break
    return LoopResult(done, total, clock.seconds)


def train_stage(args: argparse.Namespace, model: torch.nn.Module, step_loss: StepLoss, desc: str) -> LoopResult:
    """`train_resumable` with a stage script's flags (`add_loop_arguments`), checkpoints in OUTPUT_DIR/checkpoints."""
    checkpoints = RunCheckpoints(Path(args.output_dir) / "checkpoints")
    return train_resumable(model, checkpoints, LoopSettings.from_args(args), step_loss, desc)


def write_json(path: os.PathLike, data: dict) -> None:
    """Write JSON atomically (`latent_diffusion.formats.atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
