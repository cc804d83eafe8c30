"""An exponential moving average of the UNet's weights, saved as safetensors."""
from __future__ import annotations

import contextlib
import json

import torch
from safetensors.torch import load_file, save_file


class EMA:
    """θ_ema ← d θ_ema + (1 − d) θ after each optimizer step, with the warm-up d = min(decay, (1 + n)/(10 + n)).

    The shadow weights are float32 copies of the trainable parameters, on the parameters' device.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)  # θ_ema + (1 − d)(θ − θ_ema)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the averaged weights into `model`."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """Within the block `model` holds the EMA weights; its own weights come back after."""
        saved = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])

    def save(self, path: str) -> None:
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}
        save_file(tensors, path, metadata={"ema": json.dumps({"decay": self.decay, "num_updates": self.num_updates})})

    def load(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["ema"])
        tensors = load_file(path)
        if set(tensors) != set(self.shadow):
            raise ValueError(f"EMA file {path} does not match the UNet's parameters")
        for name, t in tensors.items():
            self.shadow[name].copy_(t)
        self.num_updates = int(meta["num_updates"])
