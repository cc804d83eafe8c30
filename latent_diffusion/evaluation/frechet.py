"""Fréchet distance between two Gaussians fitted to feature sets (the distance behind FID).

For N(μ₁, Σ₁) and N(μ₂, Σ₂) (Heusel et al. 2017, after Dowson & Landau 1982):

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})

Σ₁Σ₂ is not symmetric, so its square root is awkward to take directly (scipy's
`sqrtm` goes through a complex Schur form and can return imaginary noise). We
use the similar symmetric matrix instead:

    Σ₁Σ₂ = √Σ₁ (√Σ₁ Σ₂ √Σ₁) √Σ₁⁻¹   ⇒   Tr((Σ₁Σ₂)^{1/2}) = Σᵢ √λᵢ(√Σ₁ Σ₂ √Σ₁)

Both square roots come from `numpy.linalg.eigh` of symmetric positive
semi-definite matrices, in float64; eigenvalues that rounding pushes slightly
below zero are clamped to zero, so near-singular covariances (fewer samples
than feature dimensions) stay finite and real.
"""
from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean μ (D,) and unbiased covariance Σ (D, D) of `features` (N, D), in float64.

    Σ = 1/(N−1) · Σₙ (xₙ − μ)(xₙ − μ)ᵀ, as pytorch-fid and torchmetrics compute it.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D); got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"features needs at least 2 samples to fit a covariance; got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contains NaN or infinite values")
    mu = x.mean(axis=0)
    centered = x - mu  # (N, D)
    sigma = centered.T @ centered / (x.shape[0] - 1)  # (D, D)
    return mu, sigma


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root √A of a symmetric positive semi-definite A via A = V diag(λ) Vᵀ ⇒ √A = V diag(√max(λ, 0)) Vᵀ."""
    eigenvalues, eigenvectors = np.linalg.eigh(_symmetrize(matrix))
    root = np.sqrt(np.clip(eigenvalues, 0.0, None))
    return (eigenvectors * root) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ₁Σ₂)^{1/2}) = Σᵢ √λᵢ(√Σ₁ Σ₂ √Σ₁), with tiny negative eigenvalues clamped to zero."""
    root1 = symmetric_sqrt(sigma1)
    inner = _symmetrize(root1 @ sigma2 @ root1)
    eigenvalues = np.linalg.eigvalsh(inner)
    return float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}), in float64; never negative.

    (This is the squared Fréchet / 2-Wasserstein distance, the number FID reports.)
    """
    mu1, mu2 = _as_mean(mu1, "mu1"), _as_mean(mu2, "mu2")
    sigma1, sigma2 = _as_covariance(sigma1, "sigma1"), _as_covariance(sigma2, "sigma2")
    _check_dims(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(d2, 0.0))


def _symmetrize(matrix: np.ndarray) -> np.ndarray:
    """(A + Aᵀ)/2: removes the rounding asymmetry before an eigen-decomposition."""
    return 0.5 * (matrix + matrix.T)


def _as_mean(mu, name: str) -> np.ndarray:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    if mu.ndim != 1:
        raise ValueError(f"{name} must be a vector (D,); got shape {mu.shape}")
    return mu


def _as_covariance(sigma, name: str) -> np.ndarray:
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        raise ValueError(f"{name} must be a square matrix (D, D); got shape {sigma.shape}")
    if not np.all(np.isfinite(sigma)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return sigma


def _check_dims(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> None:
    dims = {"mu1": mu1.shape[0], "sigma1": sigma1.shape[0], "mu2": mu2.shape[0], "sigma2": sigma2.shape[0]}
    if len(set(dims.values())) != 1:
        raise ValueError(f"feature dimensions differ: {dims}; both sets must come from the same feature extractor")
