"""Pieces shared by the Shapes recipe's stage 0 (text) and stage 1 (VAE) scripts.

* `shapes_batch(seed, step, ...)`: batch `step` of an endless Shapes stream, a
  pure function of (seed, step), so a resumed run sees exactly the batches it
  would have seen;
* `RunCheckpoints`: `run_dir/checkpoint-N/` folders holding the weights
  (`model.safetensors`), the optimizer state (`optimizer.safetensors`, its
  tensors flattened, its hyper-parameters in the metadata) and `state.json`
  (step, compute seconds so far); written to a temporary folder and renamed,
  so a run killed at any moment resumes from its last whole checkpoint;
* `warmup_cosine_lr`: the learning rate as a function of the step (no
  scheduler state to save);
* `seed_everything_for_step`: torch's global RNG seeded from (seed, step).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latent_diffusion.shapes import caption, full_caption, render_array, sample_scene

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- data


@dataclass
class ShapesBatch:
    pixels: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    captions: list[str]  # training captions (optional parts dropped at random)
    full_captions: list[str]  # every optional part kept
    scenes: list = field(default_factory=list)


def shapes_batch(seed: int, step: int, batch_size: int, size: int = 64, split: str = "train") -> ShapesBatch:
    """Batch `step` of the (seed, split) Shapes stream: a pure function of its arguments."""
    rng = np.random.default_rng((seed, step))
    scenes = [sample_scene(rng, split) for _ in range(batch_size)]
    arrays = np.stack([render_array(s, size) for s in scenes])  # (B, S, S, 3) uint8
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, 3, S, S)
    captions = [caption(s, rng) for s in scenes]
    return ShapesBatch(pixels, captions, [full_caption(s) for s in scenes], scenes)


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
    """Atomic, resumable checkpoints of one model and its optimizer under `run_dir`."""

    def __init__(self, run_dir: os.PathLike, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def list(self) -> list[Path]:
        if not self.run_dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.run_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        found = self.list()
        return found[-1] if found else None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
        """Write checkpoint-<state['step']> (weights, optimizer, state.json) atomically; keep the newest `keep`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.run_dir / f"checkpoint-{state['step']}"
        tmp = self.run_dir / f".checkpoint-{state['step']}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old)
        return final

    def load(self, path: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
        """Restore weights (and optimizer state) from a checkpoint folder; return its state.json."""
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        if optimizer is not None:
            _load_optimizer(optimizer, path / "optimizer.safetensors")
        return json.loads((path / "state.json").read_text())


class ComputeClock:
    """Seconds of compute spent on a stage, carried across resumes through the checkpoint state."""

    def __init__(self, already: float = 0.0):
        self.already = already
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.already + time.perf_counter() - self.started


def write_json(path: os.PathLike, data: dict) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
