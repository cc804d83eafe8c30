"""A clean stop on Ctrl-C (SIGINT) or a scheduler's SIGTERM: finish the step, optionally checkpoint, exit in one line.

The handlers only set a flag; the training loop reads it between optimizer steps (all ranks agree through one
reduction, so every rank stops at the same step and a final checkpoint's barriers line up). A second signal
while stopping raises KeyboardInterrupt at once. The command turns `TrainingStopped` into one line and the
exit status 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as shells report a killed process.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """Training ended early on request; `status` is the exit status the command returns."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class StopRequest:
    """Catches SIGINT/SIGTERM while installed (as a context manager) and remembers the first one."""

    def __init__(self):
        self.signal: Optional[signal.Signals] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signal = signal.Signals(signum)

    def requested(self, accelerator) -> bool:
        """Whether any rank was signalled (a reduction across ranks when there are several: they stop together)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def stopped(self, step: int, saved: Optional[str]) -> TrainingStopped:
        """The exception that ends the run at `step`; `saved`: the checkpoint written on the way out, if any."""
        sig = self.signal or signal.SIGINT
        where = f"saved {saved}" if saved else "no checkpoint written (--checkpoint_on_stop saves one)"
        return TrainingStopped(f"stopped by {sig.name} after step {step}; {where}", 128 + int(sig))
