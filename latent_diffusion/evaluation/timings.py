"""Seconds and peak memory of each generated batch: `images/<setting>/timings.jsonl`, and their summary.

A batch's line is appended (and flushed to disk) after its images are written, so a run killed between
the two loses the line, never an image's timing twice; a line torn by a crash is skipped when read and
fenced off by the next append. Seconds per image = total timed seconds / timed images.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

TIMINGS_FILE = "timings.jsonl"


def append_timing(folder: Path, record: dict) -> None:
    """Append one JSON line to folder/timings.jsonl, flushed to disk; a torn last line from a crash is fenced off."""
    path = folder / TIMINGS_FILE
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_timings(folder: Path) -> list[dict]:
    """The batch records of folder/timings.jsonl; unreadable (torn) lines are skipped."""
    path = folder / TIMINGS_FILE
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def timing_summary(records: Sequence[dict]) -> dict:
    """Seconds per image (total timed seconds / timed images) and the peak memory over the batches."""
    images = sum(len(r["files"]) for r in records)
    if not images:
        return dict(seconds_per_image=None, timed_images=0, peak_memory_bytes=None, memory_kind=None, batches=0)
    return dict(
        seconds_per_image=sum(r["seconds"] for r in records) / images,
        timed_images=images,
        peak_memory_bytes=max(r["peak_bytes"] for r in records),
        peak_increase_bytes=max(r.get("peak_increase_bytes", 0) for r in records),
        memory_kind=records[-1]["memory_kind"],
        device=records[-1].get("device"),
        torch_threads=records[-1].get("torch_threads"),
        batches=len(records),
    )
