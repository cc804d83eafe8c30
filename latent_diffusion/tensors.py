"""Small tensor helpers shared by the math, the samplers and the pipeline."""
from __future__ import annotations

import torch


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module runs in: its first floating-point parameter's (float32 when it has none).

    diffusers' `ModelMixin.dtype` answers the same for our models, but walks every submodule for offload
    hooks first: 1.6 ms on the default UNet, asked several times per image, which is a tenth of a
    few-step image's time.
    """
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU when it has none), without diffusers' submodule walk."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def carries_hooks(module: torch.nn.Module) -> bool:
    """Whether the module or a submodule has an accelerate (`_hf_hook`) or diffusers (`_diffusers_hook`) hook:
    offloading, layerwise casting. Read from each `__dict__`, where both libraries set them: `hasattr` on a module
    goes through its `__getattr__` and costs 7× more."""
    return any("_hf_hook" in m.__dict__ or "_diffusers_hook" in m.__dict__ for m in module.modules())


def append_dims(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so per-sample values broadcast over a tensor of `ndim` dims.

    (B,) -> (B, 1, 1, 1) for ndim = 4; a 0-dim tensor stays broadcastable as it is.
    """
    missing = ndim - values.ndim
    if missing < 0:
        raise ValueError(f"values has {values.ndim} dims, more than the target's {ndim}")
    return values.reshape(*values.shape, *([1] * missing))


def gather(per_timestep: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """Pick per-timestep values at `t` and shape them to broadcast against `like`, in `like`'s dtype."""
    t = torch.as_tensor(t, device=per_timestep.device, dtype=torch.long)
    picked = per_timestep[t].to(device=like.device, dtype=like.dtype)
    return append_dims(picked, like.ndim)


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved: a seed gives the same noise on any device.

    A list of generators draws one sample per generator along dim 0, so each image of a batch has its own seed.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, dtype, device) for g in generator])
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)
