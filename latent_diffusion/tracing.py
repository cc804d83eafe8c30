"""Replaying a TorchScript trace of the UNet, so a sampling loop skips the module-by-module Python overhead.

A diffusers UNet spends most of a small model's forward time in Python (module
calls, argument checks, `inspect.signature` in every attention layer), not in
kernels. `torch.jit.trace` records the kernels of one forward for a fixed input
signature; replaying it gives the same numbers without that overhead. Traces
run with TorchScript's graph optimiser off: its profiling passes cost seconds
over the first few replays, more than a whole generation of a small model, for
little further gain. Traces are
kept per (shapes, dtypes, device) and share the UNet's parameters, so in-place
weight updates (training, EMA swaps) are seen. Anything that changes the UNet's
structure (new attention processors, fused projections) needs `clear()`.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch


class _UNetCall(torch.nn.Module):
    """The UNet as a positional (x_t, t, context) -> output function, for tracing."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


class TracedUNet:
    """Calls `unet(x, t, encoder_hidden_states=context)`, through a cached trace when `enabled` and not training.

    If tracing a signature fails, that signature falls back to the eager UNet with a warning.
    """

    def __init__(self, unet: torch.nn.Module, enabled: bool = True):
        self.unet = unet
        self.enabled = enabled
        self._traces: dict[tuple, Callable] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not self.enabled or torch.is_grad_enabled() or self.unet.training:
            return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in (x, t, context))
        with torch.jit.optimized_execution(False):
            if key not in self._traces:
                self._traces[key] = self._trace(x, t, context)
            return self._traces[key](x, t, context)

    def _trace(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> Callable:
        eager = _UNetCall(self.unet)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-only branches, fixed per key
                return torch.jit.trace(eager, (x, t, context), check_trace=False)
        except Exception as error:  # a UNet variant the tracer cannot follow: run it eagerly
            warnings.warn(f"UNet tracing failed ({error}); running it eagerly", RuntimeWarning, stacklevel=3)
            return eager

    def clear(self) -> None:
        """Forget all traces (after changing the UNet's structure)."""
        self._traces.clear()
