"""Inpainting in latent space: the mask at latent size, the masked image, and the RePaint-style blend.

Mask convention (diffusers', A1111's): 1 (white) is the region to repaint, 0
(black) is kept. Two ways to inpaint, both as diffusers'
`StableDiffusionInpaintPipeline` runs them:

- an inpainting UNet (9 input channels) sees [x_t, m, E(x ⊙ (m < ½))] and
  learns to fill the hole consistently;
- an ordinary UNet (4 channels) samples freely, and after every step the known
  region is replaced by the input's latent noised to the next timestep with
  the run's initial noise (Lugmayr et al. 2022, RePaint, Algorithm 1 line 8:
  x_{t−1} = m ⊙ x_{t−1}^unknown + (1 − m) ⊙ x_{t−1}^known, without resampling);
  after the last step the known region is z_0 itself.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) pixel mask -> (N, 1, h, w) at latent size, nearest-neighbour as diffusers resizes it."""
    return F.interpolate(mask, size=size)


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the region to repaint zeroed (mid-gray in [-1, 1]): x ⊙ (m < ½), (N, 3, H, W)."""
    return pixels * (mask < 0.5)


def blend_known_region(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x ← m ⊙ x + (1 − m) ⊙ x^known (RePaint Algorithm 1, line 8); x, known (B, C, h, w), mask (B, 1, h, w)."""
    return (1 - mask) * known + mask * x


class KnownRegionBlend:
    """A sampler step callback that re-noises the known region to the next timestep after every step.

    `add_noise(z0, noise, timesteps)` is the sampler's q(x_t | x_0) at `timesteps[0]`; `timesteps` is the
    plan the sampler runs, so after step i the known region is z_0 noised to timesteps[i + 1], and after
    the last step it is z_0.
    """

    def __init__(self, add_noise: Callable, z0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                 timesteps: torch.Tensor):
        self.add_noise = add_noise
        self.z0, self.noise, self.mask = z0, noise, mask  # (B, C, h, w), (B, C, h, w), (B, 1, h, w)
        self.timesteps = timesteps

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        last = i == len(self.timesteps) - 1
        known = self.z0 if last else self.add_noise(self.z0, self.noise, self.timesteps[i + 1:])
        return blend_known_region(x, known.to(x.dtype), self.mask.to(x.dtype))


def chain_callbacks(first: StepCallback, then: StepCallback) -> StepCallback:
    """One step callback running `first`, then `then` on its result; a returned tensor replaces x."""

    def callback(i: int, t: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
        replaced = first(i, t, x)
        x = x if replaced is None else replaced
        again = then(i, t, x)
        return x if again is None else again

    return callback
