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

A trace is a one-off cost that pays back over many calls, so `trace_after=N` runs a
signature eagerly for its first N calls and traces it at call N + 1 (ski rental: the
eager calls' extra time stays under the trace's cost until the trace is bought). Short
sessions (one image, one CLI call) never pay for a trace; long ones get it early.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch


class _UNetCall(torch.nn.Module):
    """The UNet as a positional (x_t, t, context[, text_embeds, time_ids]) -> output function, for tracing."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return call_unet(self.unet, x, t, context, *rest)


ADDED_COND_KEYS = ("text_embeds", "time_ids")  # SDXL's added_cond_kwargs, passed positionally after the context


def call_unet(unet, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """One UNet forward; `rest` is SDXL's (text_embeds, time_ids) when the UNet takes them, then an LCM UNet's
    guidance embedding `timestep_cond` when it takes one (so 0 to 3 tensors, positional for the tracer)."""
    added, timestep_cond = rest[: len(ADDED_COND_KEYS)], None
    if len(rest) % len(ADDED_COND_KEYS) == 1:  # 1 or 3: the last one is timestep_cond
        added, timestep_cond = rest[: len(rest) - 1], rest[-1]
    added_cond_kwargs = dict(zip(ADDED_COND_KEYS, added)) if added else None
    extra = {} if timestep_cond is None else {"timestep_cond": timestep_cond}
    return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs, return_dict=False, **extra)[0]


class TracedUNet:
    """Calls `unet(x, t, encoder_hidden_states=context, added_cond_kwargs=...)`, through a cached trace when `enabled`
    and not training, once a signature has run `trace_after` eager calls.

    If tracing a signature fails, that signature falls back to the eager UNet with a warning.
    """

    def __init__(self, unet: torch.nn.Module, enabled: bool = True, trace_after: int = 0):
        self.unet = unet
        self.enabled = enabled
        self.trace_after = trace_after
        self._traces: dict[tuple, Callable] = {}
        self._eager_calls: dict[tuple, int] = {}  # per signature, until it is traced

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None,
                 timestep_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        added = tuple(added_cond_kwargs[k] for k in ADDED_COND_KEYS) if added_cond_kwargs else ()
        inputs = (x, t, context, *added) + (() if timestep_cond is None else (timestep_cond,))
        if not self.enabled or torch.is_grad_enabled() or self.unet.training:
            return call_unet(self.unet, *inputs)
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in inputs)
        runner = self._traces.get(key)
        if runner is None:
            runner = self._buy_trace(key, inputs)
        if runner is None:  # still renting: an eager call
            return call_unet(self.unet, *inputs)
        with torch.jit.optimized_execution(False):
            return runner(*inputs)

    def _buy_trace(self, key: tuple, inputs: tuple[torch.Tensor, ...]) -> Optional[Callable]:
        """The signature's trace once it has run `trace_after` eager calls (kept from then on), else None."""
        calls = self._eager_calls.get(key, 0)
        if calls < self.trace_after:
            self._eager_calls[key] = calls + 1
            return None
        with torch.jit.optimized_execution(False):
            self._traces[key] = self._trace(inputs)
        return self._traces[key]

    @property
    def num_traces(self) -> int:
        """How many input signatures replay a trace now."""
        return len(self._traces)

    def _trace(self, inputs: tuple[torch.Tensor, ...]) -> Callable:
        eager = _UNetCall(self.unet)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-only branches, fixed per key
                return torch.jit.trace(eager, inputs, check_trace=False)
        except Exception as error:  # a UNet variant the tracer cannot follow: run it eagerly
            warnings.warn(f"UNet tracing failed ({error}); running it eagerly", RuntimeWarning, stacklevel=3)
            return eager

    def clear(self) -> None:
        """Forget all traces and eager-call counts (after changing the UNet's structure)."""
        self._traces.clear()
        self._eager_calls.clear()
