"""Training speed options of train_text2img.py: memory format, torch.compile, the AdamW kernel, loss read-back.

Each option is measured in benchmarks/RESULTS.md ("Training throughput against diffusers'
train_text_to_image.py"); the defaults are the ones that helped there or cost nothing:

- `--adamw_implementation auto`: torch's fused AdamW kernel where the device has one (CUDA, CPU, XPU,
  MPS), one kernel per step over all parameters instead of a Python loop over them;
- `--loss_log_steps N`: the loss stays on the device and is read back (a host sync on a GPU) only every
  N steps, as the mean of those N steps, for the trackers and the progress bar;
- `--channels_last` (off by default): NHWC convolutions; whether it helps depends on the device and model;
- `--compile` (off by default): `torch.compile` of the UNet in place (`nn.Module.compile`), so the state
  dict, `unwrap_model`, checkpoints and the saved pipeline are unchanged. The first steps pay the
  compilation.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
FUSED_DEVICES = ("cuda", "cpu", "xpu", "mps")  # torch.optim.AdamW(fused=True) has kernels for these


def add_speed_args(g) -> None:
    """The speed flags, as one argument group of train_text2img.py's parser."""
    g.add_argument("--adamw_implementation", default="auto", choices=ADAMW_IMPLEMENTATIONS,
                   help="AdamW kernel: fused (one kernel for all parameters), foreach (batched ops), for-loop "
                        "(one parameter at a time); auto: fused where the device has it")
    g.add_argument("--channels_last", action="store_true", help="train the UNet in channels_last memory format")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (the first steps compile; pays off on long runs)")
    g.add_argument("--compile_mode", default="default", choices=COMPILE_MODES, help="torch.compile mode")
    g.add_argument("--loss_log_steps", type=int, default=10,
                   help="read the loss back from the device every N steps (their mean goes to the trackers "
                        "and the progress bar); 1 logs every step at the cost of a host sync per step")


def check_speed_args(args: argparse.Namespace) -> list[str]:
    """Problems in the speed flags, each naming its flag."""
    return [f"--loss_log_steps must be >= 1, got {args.loss_log_steps}"] if args.loss_log_steps < 1 else []


def adamw_options(implementation: str, device: torch.device) -> dict:
    """Keyword arguments of torch.optim.AdamW selecting its kernel on `device`."""
    if implementation == "auto":
        return {"fused": True} if device.type in FUSED_DEVICES else {}
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[implementation]


def speed_up_unet(unet: torch.nn.Module, channels_last: bool = False, compile: bool = False,
                  compile_mode: str = "default") -> torch.nn.Module:
    """Put the UNet in channels_last and/or compile it in place; returns the same module."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile(mode=None if compile_mode == "default" else compile_mode)
    return unet


class LossMeter:
    """Sums per-step losses on their device; `read()` returns their mean with one host sync, and resets."""

    def __init__(self, every: int):
        self.every = every
        self.total: Optional[torch.Tensor] = None
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.total = loss if self.total is None else self.total + loss
        self.count += 1

    def due(self, step: int, last_step: int) -> bool:
        """True every `every` steps, and at the last step."""
        return self.count > 0 and (step % self.every == 0 or step >= last_step)

    def read(self) -> float:
        mean = (self.total / self.count).item()  # the one host sync of the window
        self.total, self.count = None, 0
        return mean
