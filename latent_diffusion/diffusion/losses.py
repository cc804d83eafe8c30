"""The training objective of DDPM's Algorithm 1, whole: draw t and ε, noise z_0, predict, min-SNR-γ-weighted MSE.

`DenoisingLoss(schedule, snr_gamma, noise_offset)` holds the settings; calling it with a network, z_0,
the conditioning and a generator returns the loss. The network is any `net(z_t, t, cond)` returning its
ε, v or x_0 prediction (the schedule's `prediction_type`), so the loss knows nothing of UNet keywords.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from latent_diffusion.diffusion.gaussian import min_snr_weight, q_sample, training_target
from latent_diffusion.diffusion.schedules import NoiseSchedule
from latent_diffusion.tensors import gather, randn

NetFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class DenoisingLoss:
    """loss = E_{t,ε} [ w(t) · ‖target − net(z_t, t, c)‖² ], averaged over pixels, then (unless `reduce=False`) the batch.

    t ~ U{0..T−1}, ε ~ N(0, I) (plus per-channel offset noise if `noise_offset`), z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε;
    the target is ε, v or z_0 and w(t) the min-SNR-γ weight (1 without `snr_gamma`).
    """

    def __init__(self, schedule: NoiseSchedule, snr_gamma: Optional[float] = None, noise_offset: float = 0.0):
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
        self.alphas_cumprod = schedule.alphas_cumprod  # (T,) float64
        self.prediction_type = schedule.prediction_type  # checked by NoiseSchedule
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    def __call__(self, net: NetFn, z0: torch.Tensor, cond: Any, generator: Optional[torch.Generator],
                 reduce: bool = True, weight_map: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z0: (B, C, h, w); `cond` is passed to `net` as is. Draws t, then ε, then the offset, from `generator`.
        `weight_map` (B, 1, h, w), e.g. a mask, weighs each squared error before the mean (masked loss)."""
        batch = z0.shape[0]
        # 1. t ~ U{0..T−1}, drawn on the host so that gathering ᾱ_t needs no device sync
        t_host = torch.randint(0, self.alphas_cumprod.shape[0], (batch,), generator=generator)  # (B,)
        # 2. ε ~ N(0, I); offset noise adds a per-channel constant shift (Guttenberg 2023)
        noise = randn(tuple(z0.shape), generator, z0.dtype, z0.device)  # (B, C, h, w)
        if self.noise_offset:
            noise = noise + self.noise_offset * randn((batch, z0.shape[1], 1, 1), generator, z0.dtype, z0.device)
        # 3. z_t ~ q(z_t | z_0) (DDPM eq. 4)
        alpha_bar = gather(self.alphas_cumprod, t_host, z0)  # (B, 1, 1, 1)
        z_t = q_sample(z0, noise, alpha_bar)
        # 4. w(t) ‖target − net(z_t, t, c)‖² (Algorithm 1, line 5)
        return self.weighted_mse(net(z_t, t_host.to(z0.device), cond), z0, noise, alpha_bar, reduce, weight_map)

    def weighted_mse(self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                     reduce: bool = True, weight_map: Optional[torch.Tensor] = None) -> torch.Tensor:
        """w(t) ‖target − model_output‖² per sample (B,), or its batch mean; all (B, C, H, W), ᾱ_t e.g. (B, 1, 1, 1);
        with `weight_map` (B, 1, H, W) the mean of m · (target − output)² instead (kohya's masked loss)."""
        target = training_target(x0, noise, alpha_bar, self.prediction_type)
        squared = (model_output.float() - target.float()).pow(2)  # (B, C, H, W)
        if weight_map is not None:
            squared = squared * weight_map.float()
        per_sample = squared.mean(dim=tuple(range(1, x0.ndim)))  # (B,)
        if self.snr_gamma is not None:
            per_sample = min_snr_weight(alpha_bar.reshape(-1).float(), self.snr_gamma, self.prediction_type) * per_sample
        return per_sample.mean() if reduce else per_sample
