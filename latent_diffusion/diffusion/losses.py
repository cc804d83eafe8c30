"""The denoising loss of DDPM's Algorithm 1, with ε, v or x_0 targets and min-SNR-γ weights."""
from __future__ import annotations

from typing import Optional

import torch

from latent_diffusion.diffusion.gaussian import min_snr_weight, training_target
from latent_diffusion.diffusion.schedules import PREDICTION_TYPES


class DenoisingLoss:
    """loss = E_t,ε [ w(t) · ‖target − model_output‖² ], averaged over pixels, then over the batch.

    Settings live in `__init__`; `__call__` is the math, with the seeds' names.
    """

    def __init__(self, prediction_type: str = "epsilon", snr_gamma: Optional[float] = None):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma

    def __call__(
        self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor
    ) -> torch.Tensor:
        """model_output, x0, noise: (B, C, H, W); alpha_bar: ᾱ_t broadcastable to them, e.g. (B, 1, 1, 1)."""
        target = training_target(x0, noise, alpha_bar, self.prediction_type)
        per_sample = (model_output.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
        if self.snr_gamma is None:
            return per_sample.mean()
        weight = min_snr_weight(alpha_bar.reshape(-1).float(), self.snr_gamma, self.prediction_type)  # (B,)
        return (weight * per_sample).mean()
