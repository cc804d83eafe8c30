"""FID, and Fréchet distances in other feature spaces (FD-CLIP), between generated and reference images.

    FID = d²(N(μ_g, Σ_g), N(μ_r, Σ_r)) = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2 (Σ_g Σ_r)^{1/2})

with (μ, Σ) fitted to the 2048-d pool features of the FID Inception-v3
(`inception.py`). The same distance in another network's feature space is a
different measure and is reported under that network's name: with a CLIP image
tower (`CLIPImageEmbedder`) it is "FD-CLIP", never "FID". Every extractor
carries its `measure_name`, and saved reference statistics record it, so the
two cannot be mixed up.

An extractor is any `torch.nn.Module` mapping images in [0, 1] (B, 3, H, W) to
features (B, D). FID is biased upward at small sample counts (it is usually
quoted for ≥ 10k images); compare numbers only at equal counts.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latent_diffusion.formats.atomic import atomic_write
from latent_diffusion.evaluation.clip_score import CLIPImageEmbedder
from latent_diffusion.evaluation.frechet import feature_statistics, frechet_distance
from latent_diffusion.evaluation.images import iter_batches, stack_same_size
from latent_diffusion.evaluation.inception import load_fid_inception

DEFAULT_BATCH_SIZE = 50


def measure_name(extractor: nn.Module) -> str:
    """What a Fréchet distance in `extractor`'s feature space is called: "FID", "FD-CLIP", or plain "FD"."""
    return getattr(extractor, "measure_name", "FD")


def _input_device_dtype(extractor: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(extractor.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


@torch.no_grad()
def image_features(extractor: nn.Module, images, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Features (N, D), float64, of `images` (a folder, PIL list, array or tensor; see `images.py`), in order."""
    device, dtype = _input_device_dtype(extractor)
    features = []
    for batch in iter_batches(images, batch_size):
        for run in stack_same_size(batch):  # (b, 3, H, W), one size per run
            features.append(extractor(run.to(device, dtype)).float().cpu())  # (b, D)
    if not features:
        raise ValueError("images is empty; need at least 2 images to fit feature statistics")
    return torch.cat(features).double().numpy()


def save_reference_statistics(folder: str | os.PathLike, out_path: str | os.PathLike,
                              extractor: nn.Module | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> Path:
    """Fit (μ, Σ) to the features of the images in `folder` and save them as .npz (mu, sigma, measure, num_images).

    `extractor` defaults to the FID Inception (its weights must be available, see `load_fid_inception`).
    The file is written to a temporary name and then renamed, so a crash leaves no half-written statistics.
    """
    extractor = extractor if extractor is not None else load_fid_inception()
    features = image_features(extractor, folder, batch_size)
    mu, sigma = feature_statistics(features)
    out_path = Path(out_path)
    if out_path.suffix != ".npz":
        raise ValueError(f"out_path must end in .npz; got {str(out_path)!r}")
    with atomic_write(out_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, measure=np.array(measure_name(extractor)), num_images=len(features))
    return out_path


def load_reference_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, str | None]:
    """(mu, sigma, measure) from an .npz (ours, or pytorch-fid's with only mu and sigma: measure is then None)."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise ValueError(f"reference statistics {str(path)!r} lack {sorted(missing)}; found {data.files}")
        measure = str(data["measure"]) if "measure" in data.files else None
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), measure


def reference_statistics(reference, extractor: nn.Module, batch_size: int = DEFAULT_BATCH_SIZE):
    """(mu, sigma) of `reference`: an .npz of statistics, a (mu, sigma) pair, or images (a folder, list, ...)."""
    if isinstance(reference, tuple) and len(reference) == 2:
        return np.asarray(reference[0], np.float64), np.asarray(reference[1], np.float64)
    if isinstance(reference, (str, os.PathLike)) and Path(reference).suffix == ".npz":
        mu, sigma, measure = load_reference_statistics(reference)
        if measure is not None and measure != measure_name(extractor):
            raise ValueError(
                f"reference {str(reference)!r} holds {measure} statistics but the extractor measures "
                f"{measure_name(extractor)}; recompute them with save_reference_statistics(..., extractor=...)"
            )
        return mu, sigma
    return feature_statistics(image_features(extractor, reference, batch_size))


def compute_fid(generated_images, reference, extractor: nn.Module | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """d² between Gaussians fitted to the features of `generated_images` and of `reference`.

    `reference`: a folder of images, images in memory, an .npz of statistics, or a (mu, sigma) pair.
    `extractor` defaults to the FID Inception (this is then FID); report other extractors under
    `measure_name(extractor)`.
    """
    extractor = extractor if extractor is not None else load_fid_inception()
    mu_r, sigma_r = reference_statistics(reference, extractor, batch_size)
    mu_g, sigma_g = feature_statistics(image_features(extractor, generated_images, batch_size))
    return frechet_distance(mu_g, sigma_g, mu_r, sigma_r)


def fd_clip_extractor(model_path: str | os.PathLike, device: str | torch.device | None = None) -> CLIPImageEmbedder:
    """The FD-CLIP feature extractor: the image tower of the transformers CLIP model at `model_path`."""
    return CLIPImageEmbedder(model_path, device=device)


def compute_fd_clip(generated_images, reference, model_path: str | os.PathLike,
                    batch_size: int = DEFAULT_BATCH_SIZE, device: str | torch.device | None = None) -> float:
    """FD-CLIP: the Fréchet distance in the CLIP image-embedding space of `model_path` (works offline)."""
    extractor = fd_clip_extractor(model_path, device)
    return compute_fid(generated_images, reference, extractor=extractor, batch_size=batch_size)
