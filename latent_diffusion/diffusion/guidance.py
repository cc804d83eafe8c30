"""Classifier-free guidance and guidance rescale."""
from __future__ import annotations

import torch


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """ε̃ = ε_u + w (ε_c − ε_u) (Ho & Salimans 2022, eq. 6); w = 1 is the conditional model alone."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Pull the guided prediction's per-sample std back to the conditional one's (Lin et al. 2023, eq. 15–16).

    x_rescaled = x_cfg · σ(x_cond)/σ(x_cfg);  x_final = φ x_rescaled + (1 − φ) x_cfg.
    """
    if phi == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1.0 - phi) * guided


def guide(output: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Split a batched (uncond, cond) UNet output along dim 0 and apply guidance and its rescale."""
    uncond, cond = output.chunk(2)  # each (B, C, H, W)
    return rescale_guidance(classifier_free_guidance(uncond, cond, scale), cond, rescale)


def guidance_scale_embedding(guidance_scale: float, batch: int, dim: int) -> torch.Tensor:
    """The (batch, dim) embedding of w = guidance_scale − 1 that a guidance-distilled UNet (LCM, `time_cond_proj_dim`)
    takes as `timestep_cond` (LCM §4.2, eq. 11's ω-conditioned f_θ(z, ω, c, t)) instead of running CFG.

    Sinusoidal in 1000 w at frequencies 10000^(−k/(d/2 − 1)), k < d/2, sines then cosines (the VDM/Imagen
    timestep embedding); an odd d gets one zero column. Float32, as diffusers builds it.
    """
    w = torch.full((batch,), guidance_scale - 1.0, dtype=torch.float32) * 1000.0  # (B,)
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    angles = w[:, None] * frequencies[None, :]  # (B, d/2)
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)  # (B, 2·(d/2))
    return torch.nn.functional.pad(embedding, (0, dim % 2))
