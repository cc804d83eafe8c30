"""Training checkpoints: `output_dir/checkpoint-N`, written atomically, pruned to a limit, resumed exactly.

A checkpoint holds accelerate's state (UNet weights as safetensors, optimizer,
LR schedule, RNG states), `ema.safetensors` when EMA is on, and
`training_state.json` with the step and the data position (epoch and step
within it). It is written to `.checkpoint-N.tmp` and renamed when complete, so
a run killed at any moment leaves only whole checkpoints behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Optional

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"


@dataclass
class TrainingState:
    """Where training stands: optimizer steps done, and the data position they reached."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint folders of a run, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """The folder to resume from: None, the latest of the run ("latest"; None if there is none yet) or a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder "
                         f"(no {STATE_FILE})")
    return resume_from_checkpoint


def save_checkpoint(accelerator, output_dir: str, state: TrainingState, ema=None, limit: Optional[int] = None) -> str:
    """Write `checkpoint-<step>` atomically on all processes together; prune to `limit`; return its path."""
    final = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    tmp = os.path.join(output_dir, f".checkpoint-{state.global_step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank writes its own random states into tmp: rename only after all have
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(os.path.join(tmp, EMA_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(asdict(state), f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str, limit: Optional[int]) -> list[str]:
    """Delete the oldest checkpoints beyond `limit`; return the deleted paths."""
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - limit)] if limit else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def load_checkpoint(accelerator, path: str, ema=None) -> TrainingState:
    """Restore accelerate's state and the EMA from `path`; return the training position saved there."""
    accelerator.load_state(path)
    if ema is not None:
        ema_path = os.path.join(path, EMA_FILE)
        if not os.path.isfile(ema_path):
            raise ValueError(f"--use_ema is set but checkpoint {path!r} has no {EMA_FILE}")
        ema.load(ema_path)
    with open(os.path.join(path, STATE_FILE)) as f:
        return TrainingState(**json.load(f))


def checkpoint_weights(path: str) -> list[str]:
    """The safetensors weight files of a checkpoint (model and EMA; never optimizer state)."""
    return sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
