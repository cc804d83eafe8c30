"""Training checkpoints: `output_dir/checkpoint-N`, written atomically, pruned to a limit, resumed exactly.

A checkpoint holds accelerate's state (UNet weights as safetensors, optimizer,
LR schedule, RNG states), `ema.safetensors` when EMA is on, and
`training_state.json` with the step and the data position (epoch and step
within it). It is written to `.checkpoint-N.tmp` and renamed when complete, so
a run killed at any moment leaves only whole checkpoints behind.

The multi-process protocol (every rank writes its own random states):
1. the main rank creates `.checkpoint-N.tmp`; barrier, so no rank writes into a folder not yet made;
2. every rank runs `save_state` into it; barrier, so the folder is renamed only after all have written;
3. the main rank adds the EMA and, last, `training_state.json` (the completeness mark), then renames
   the folder to `checkpoint-N` (an older `checkpoint-N` is moved aside first and deleted after); barrier.
A kill at any moment leaves `checkpoint-*` folders that are whole plus, at most, a `.checkpoint-N.tmp`
or `.checkpoint-N.old` leftover, which `discard_partial_checkpoints` clears when the next run starts.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Optional

from latent_diffusion.formats.atomic import write_text_atomic

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_RE = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old)$")
STATE_FILE = "training_state.json"
EMA_FILE = "ema.safetensors"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only); its partial folder was removed."""


@dataclass
class TrainingState:
    """Where training stands: optimizer steps done, and the data position they reached."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    data_order: Optional[dict] = None  # the settings that fix the batches (DataOrder as a dict); None before they were saved


@dataclass(frozen=True)
class DataOrder:
    """What decides which samples an epoch's step k holds: a change to any of them moves the saved position."""

    seed: int
    rows: int  # readable dataset rows
    train_batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    bucketed: bool

    @property
    def samples_per_step(self) -> int:
        return self.train_batch_size * self.gradient_accumulation_steps * self.num_processes


def continue_position(state: TrainingState, order: DataOrder, steps_per_epoch: int) -> tuple[TrainingState, str]:
    """The resumed state moved to the same data position under `order`, and a note of what changed ("" if nothing).

    An epoch's samples are one permutation of the rows fixed by (seed, epoch) and taken in order, samples_per_step
    at a time, so with only the batch layout changed the saved position maps to the step after the same number of
    samples. A changed seed, dataset or bucketing changes the permutation: the run goes on from the next epoch.
    """
    saved = DataOrder(**state.data_order) if state.data_order else order
    keys = [k for k in DataOrder.__dataclass_fields__ if getattr(saved, k) != getattr(order, k)]
    changed = [f"{k} {getattr(saved, k)} -> {getattr(order, k)}" for k in keys]
    epoch, step = state.epoch, state.step_in_epoch
    if {"seed", "rows", "bucketed"} & set(keys) or (keys and order.bucketed):
        epoch, step = epoch + (step > 0), 0
    elif changed:
        step = -(-step * saved.samples_per_step // order.samples_per_step)  # ceil: no sample twice
    if step >= steps_per_epoch:
        epoch, step = epoch + 1, 0
    note = (f"{', '.join(changed)} since the checkpoint: continuing at epoch {epoch}, step {step} of "
            f"{steps_per_epoch}") if changed or (epoch, step) != (state.epoch, state.step_in_epoch) else ""
    return TrainingState(state.global_step, epoch, step, asdict(order)), note


def list_checkpoints(output_dir: str, mark: str = STATE_FILE) -> list[str]:
    """Complete checkpoint folders of a run (those holding `mark`, the file written last), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)
            if os.path.isfile(os.path.join(output_dir, name, mark))]


def discard_partial_checkpoints(output_dir: str) -> list[str]:
    """Clear what a killed save left behind: delete `.checkpoint-N.tmp`, put back a `.checkpoint-N.old`.

    A `.old` folder is a whole checkpoint moved aside while its step was being saved again; it is
    restored when the new one never arrived, deleted otherwise. Returns the paths removed or restored.
    """
    if not os.path.isdir(output_dir):
        return []
    touched = []
    for name in sorted(os.listdir(output_dir)):
        match = PARTIAL_RE.match(name)
        if not match:
            continue
        path, final = os.path.join(output_dir, name), os.path.join(output_dir, f"checkpoint-{match.group(1)}")
        if match.group(2) == "old" and not os.path.isdir(final):
            os.replace(path, final)
        else:
            shutil.rmtree(path)
        touched.append(path)
    return touched


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str], mark: str = STATE_FILE) -> Optional[str]:
    """The folder to resume from: None, the latest of the run ("latest"; None if there is none yet) or a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir, mark)
        return found[-1] if found else None
    if not os.path.isdir(resume_from_checkpoint):
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} does not exist "
                         "(give a checkpoint folder or 'latest')")
    if not os.path.isfile(os.path.join(resume_from_checkpoint, mark)):
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint folder "
                         f"(no {mark})")
    return resume_from_checkpoint


def save_checkpoint(accelerator, output_dir: str, state: TrainingState, ema=None, limit: Optional[int] = None) -> str:
    """Write `checkpoint-<step>` atomically on all processes together; prune to `limit`; return its path."""
    final = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    tmp = os.path.join(output_dir, f".checkpoint-{state.global_step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()  # 1. the folder exists before any rank writes into it
    try:
        accelerator.save_state(tmp, safe_serialization=True)
        accelerator.wait_for_everyone()  # 2. every rank wrote its random states into tmp: rename only after all have
        if accelerator.is_main_process:
            if ema is not None:
                ema.save(os.path.join(tmp, EMA_FILE))
            write_text_atomic(os.path.join(tmp, STATE_FILE), json.dumps(asdict(state), indent=2))  # last: the mark
            publish_checkpoint(tmp, final)
            prune_checkpoints(output_dir, limit)
    except OSError as error:  # a full disk, a quota, a read-only mount: say so, and leave no half checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint-{state.global_step} in {output_dir!r}: "
                                   f"{error.strerror or error}; the earlier checkpoints are intact") from None
    accelerator.wait_for_everyone()  # 3. no rank goes on (or reads checkpoints) before the rename
    return final


def publish_checkpoint(tmp: str, final: str) -> None:
    """Rename the complete `tmp` onto `final`; an existing `final` is moved aside first, so one always exists."""
    old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old")
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(output_dir: str, limit: Optional[int], mark: str = STATE_FILE) -> list[str]:
    """Delete the oldest checkpoints beyond `limit`; return the deleted paths."""
    found = list_checkpoints(output_dir, mark)
    doomed = found[: max(0, len(found) - limit)] if limit else []
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def load_checkpoint(accelerator, path: str, ema=None) -> TrainingState:
    """Restore accelerate's state and the EMA from `path`; return the training position saved there."""
    try:
        accelerator.load_state(path)
    except RuntimeError as error:  # torch's state-dict mismatch: dozens of lines of missing/unexpected keys
        summary = str(error).strip().splitlines()[0][:200]
        raise ValueError(f"--resume_from_checkpoint {path!r} holds weights of a different model than this run's "
                         f"UNet ({summary}); resume with the settings it was trained with") from None
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
