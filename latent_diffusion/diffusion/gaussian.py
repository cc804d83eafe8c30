"""The Gaussian diffusion process: forward noising, the posterior, and conversions between predictions.

Every function is pure and takes the schedule values it needs (ᾱ_t already
gathered and broadcast, see `utils.gather`), so that the same code serves the
samplers, the training loss and the tests.
"""
from __future__ import annotations

import torch

from latent_diffusion.diffusion.schedules import PREDICTION_TYPES, snr


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), reparameterised: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (DDPM eq. 4)."""
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def step_beta(alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """β_t = 1 − α_t with α_t = ᾱ_t / ᾱ_{t−1} (DDPM §2; for a strided step t -> s, β_t|s = 1 − ᾱ_t / ᾱ_s)."""
    return 1.0 - alpha_bar / alpha_bar_prev


def posterior_variance(alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t (DDPM eq. 7), β_t from `step_beta` (so strided steps work too).

    The one definition of β̃: q_posterior's variance, DDPM's "fixed_small" σ_t², and DDIM's σ_t(η)² / η² (DDIM eq. 16).
    """
    return (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * step_beta(alpha_bar, alpha_bar_prev)


def posterior_mean_coefficients(
    alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients of μ̃_t = c_0 x_0 + c_t x_t (DDPM eq. 7), with α_t = ᾱ_t/ᾱ_{t−1} for strided steps.

    c_0 = √ᾱ_{t−1} β_t / (1 − ᾱ_t),   c_t = √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t).
    The one definition of μ̃: `q_posterior` and DDPM sampling (Algorithm 2) both use it.
    """
    alpha = alpha_bar / alpha_bar_prev
    beta = step_beta(alpha_bar, alpha_bar_prev)  # = 1 − α_t, the same float
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar)
    coef_xt = alpha.sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    return coef_x0, coef_xt


def q_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean μ̃_t and variance β̃_t of q(x_{t−1} | x_t, x_0) (DDPM eq. 6–7).

    μ̃_t = c_0 x_0 + c_t x_t (`posterior_mean_coefficients`); β̃_t: `posterior_variance`.
    """
    coef_x0, coef_xt = posterior_mean_coefficients(alpha_bar, alpha_bar_prev)
    return coef_x0 * x0 + coef_xt * x_t, posterior_variance(alpha_bar, alpha_bar_prev)


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t (DDPM eq. 4 solved for x_0)."""
    return (x_t - (1.0 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε̂ = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)."""
    return (x_t - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).sqrt()


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 (Salimans & Ho 2022, §4)."""
    return alpha_bar.sqrt() * eps - (1.0 - alpha_bar).sqrt() * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v."""
    return alpha_bar.sqrt() * x_t - (1.0 - alpha_bar).sqrt() * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε̂ = √(1 − ᾱ_t) x_t + √ᾱ_t v."""
    return (1.0 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v


def predictions_from_output(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂_0) from a network output that predicts ε, v or x_0."""
    if prediction_type == "epsilon":
        return output, x0_from_eps(x_t, output, alpha_bar)
    if prediction_type == "v_prediction":
        return eps_from_v(x_t, output, alpha_bar), x0_from_v(x_t, output, alpha_bar)
    if prediction_type == "sample":
        return eps_from_x0(x_t, output, alpha_bar), output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network learns to output at x_t: ε, v or x_0 (Algorithm 1 of DDPM, generalised)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, noise, alpha_bar)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def min_snr_weight(alpha_bar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023, eq. 7), expressed for the chosen target.

    The x_0 loss is weighted by min(SNR, γ); an ε loss equals SNR times the x_0
    loss, so it takes min(SNR, γ)/SNR; a v loss equals (SNR + 1) times it, so
    min(SNR, γ)/(SNR + 1).
    """
    s = snr(alpha_bar)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
