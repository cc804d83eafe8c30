"""Atomic file writes: write beside the target, then rename, so a reader never sees half a file.

A process killed mid-write leaves at most a stray `.NAME.tmp-PID` next to the target, never a truncated
target. Every writer of results, caches, cards and images goes through `atomic_write`; writers of whole
folders (a saved pipeline, a checkpoint) through `atomic_folder`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_write(path: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    `suffix` keeps an extension on the temporary name for writers that pick a format from it (PIL, torch).
    Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it takes the place of `path`, on error it is removed.

    For outputs made of several files (a saved pipeline, a checkpoint): a reader sees the old folder or the
    complete new one, never a half-written one. An old folder at `path` is deleted just before the rename
    (directories cannot be swapped atomically), so a kill in that instant leaves neither, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cannot_create_files_in(folder: str) -> Optional[str]:
    """None when a file can be created in `folder` (a temporary file is made and removed), else the reason.

    os.access is not enough: root may "write" anywhere, and /proc or a read-only mount says yes to it."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    except OSError as error:
        return error.strerror or str(error)
    os.close(handle)
    os.unlink(name)
    return None
