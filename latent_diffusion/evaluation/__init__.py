"""Evaluation measures: FID (and FD-CLIP), CLIP score, and speed / peak memory.

    frechet      d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}), stable, float64
    inception    the FID Inception-v3 in plain torch; weights from a local file only
    fid          FID / FD-CLIP between generated and reference images (folders, arrays, or saved statistics)
    clip_score   CLIP-S = 100 · max(cos(E_I, E_C), 0), averaged
    resources    median seconds per call and peak memory
    images       the image inputs every measure accepts
    report       `latent-diffusion eval`: a grid of settings generated, scored and reported (resumable),
                 in steps: settings, prompts, run_folder, timings, generation, quality, scoring, markdown

transformers is imported only when a CLIP model is loaded.
"""
from latent_diffusion.evaluation.clip_score import CLIPImageEmbedder, CLIPScorer, clip_score
from latent_diffusion.evaluation.fid import (
    compute_fd_clip,
    compute_fid,
    fd_clip_extractor,
    image_features,
    load_reference_statistics,
    measure_name,
    save_reference_statistics,
)
from latent_diffusion.evaluation.frechet import feature_statistics, frechet_distance
from latent_diffusion.evaluation.inception import WEIGHTS_ENV_VAR, FIDInception, FIDWeightsNotFoundError, load_fid_inception
from latent_diffusion.evaluation.prompts import shapes_eval_prompts
from latent_diffusion.evaluation.report import rebuild_report, run_evaluation
from latent_diffusion.evaluation.run_folder import EvalRun
from latent_diffusion.evaluation.settings import SettingsRequest
from latent_diffusion.evaluation.resources import Measurement, measure

__all__ = [
    "CLIPImageEmbedder",
    "CLIPScorer",
    "EvalRun",
    "FIDInception",
    "FIDWeightsNotFoundError",
    "Measurement",
    "SettingsRequest",
    "WEIGHTS_ENV_VAR",
    "clip_score",
    "compute_fd_clip",
    "compute_fid",
    "fd_clip_extractor",
    "feature_statistics",
    "frechet_distance",
    "image_features",
    "load_fid_inception",
    "load_reference_statistics",
    "measure",
    "measure_name",
    "rebuild_report",
    "run_evaluation",
    "save_reference_statistics",
    "shapes_eval_prompts",
]
