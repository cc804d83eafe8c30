"""`latent-diffusion eval`: generate, score and report one model over a grid of sampler settings.

A *setting* is (sampler, steps, guidance scale). For every setting the model
draws one image per (prompt, seed); the images are scored and summarised.
The pipeline is passed in (the library never imports it), so any object with
the `LatentDiffusionPipeline` call signature works.

The evaluation folder (`out_dir`; the command's `--out`):

    run.json                          what was asked: model, size, prompts, seeds, settings
    images/<setting>/p0003-s0.png     one image per (setting, prompt index, seed), written atomically
    images/<setting>/timings.jsonl    one line per generated batch: its files, seconds, peak memory
    results.json                      every number, and a judgement per image
    report.md                         the summary table, notes, links to grids and plots
    grids/<setting>.png, grids/comparison.png
    plots/<measure>-vs-seconds-w<guidance>.png

Each job has its module: `settings.py` (what to sample with), `prompts.py`
(what to draw), `run_folder.py` (the run and its folder), `timings.py` and
`resources.py` (seconds and peak memory), `generation.py` (the images),
`quality.py` (FID, FD-CLIP, CLIP score), `scoring.py` (adherence and
results.json), `markdown.py` (report.md), `grids.py` and `plots.py`; this
module runs them in order.

Resuming: an image whose PNG exists is never generated again, so a run
killed at any moment continues where it stopped, and a finished run rebuilds
its report from the saved images and timings (`rebuild_report`) without the
model. `run.json` guards the folder: a rerun with another model, size or
prompt list is refused rather than mixed in.

Measures:

- seconds per image: wall time of each pipeline call on a batch of up to
  `batch_size` images (consecutive prompts, one seed), after one untimed
  warm-up call, divided by the images in the batch; text encoding, sampling
  and VAE decoding count, PNG writing and scoring do not.
- peak memory: per batch, `torch.cuda.max_memory_allocated` on CUDA, or the
  process's sampled resident set size on CPU (which includes the loaded
  model; see `resources.py`); the maximum over the setting's batches.
- Shapes adherence: the fraction of images `latent_diffusion.shapes.score_images`
  judges exactly as prompted, for the prompts that parse in the Shapes
  grammar; "overall" and the categories leave held-out colour-shape pairs
  out, which are reported apart.
- FID (with reference images and the FID Inception weights), FD-CLIP and
  CLIP score (with a CLIP model folder); see `fid.py` and `clip_score.py`.

Image k of prompt i is drawn with `torch.Generator().manual_seed(image_seed(i, k))`,
recorded in the PNG's metadata, so `latent-diffusion generate --seed` reproduces it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from latent_diffusion.formats.atomic import write_text_atomic
from latent_diffusion.evaluation.generation import generate_missing
from latent_diffusion.evaluation.markdown import markdown_report
from latent_diffusion.evaluation.prompts import EvalPrompt, load_prompt_file, make_prompt, shapes_eval_prompts
from latent_diffusion.evaluation.quality import QualityMeasures
from latent_diffusion.evaluation.run_folder import EvalRun, image_seed, prepare_out_dir
from latent_diffusion.evaluation.scoring import collect_results, shapes_adherence
from latent_diffusion.evaluation.settings import Setting, SettingsRequest

__all__ = [
    "EvalPrompt", "EvalRun", "QualityMeasures", "Setting", "SettingsRequest", "collect_results", "image_seed",
    "load_prompt_file", "make_prompt", "prepare_out_dir", "rebuild_report", "run_evaluation", "shapes_adherence",
    "shapes_eval_prompts", "write_report",
]


def write_report(run: EvalRun, results: dict) -> list[Path]:
    """Write grids, plots, results.json and report.md into run.out_dir; returns [report.md, results.json, ...]."""
    from latent_diffusion.evaluation.grids import write_grids
    from latent_diffusion.evaluation.plots import write_quality_plots

    grids = write_grids(run, results["results"])
    plots = write_quality_plots(results["results"], run.out_dir / "plots")
    json_path = write_text_atomic(run.out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    markdown = markdown_report(dict(results, out_dir=str(run.out_dir)), grids, plots)
    report_path = write_text_atomic(run.out_dir / "report.md", markdown)
    return [report_path, json_path, *grids, *plots]


def run_evaluation(pipe, run: EvalRun, measures: Callable[[], Optional[QualityMeasures]] | None = None,
                   progress: bool = True) -> list[Path]:
    """Generate what is missing, score everything, write the report; `measures` builds the QualityMeasures."""
    prepare_out_dir(run)
    pipe.set_progress_bar_config(disable=True)
    generate_missing(pipe, run, progress)
    return rebuild_report(run, measures, progress)


def rebuild_report(run: EvalRun | str | os.PathLike, measures: Callable[[], Optional[QualityMeasures]] | None = None,
                   progress: bool = True) -> list[Path]:
    """Score the saved images and write the report, without the model (`run` may be an evaluation folder)."""
    run = run if isinstance(run, EvalRun) else EvalRun.from_manifest(run)
    results = collect_results(run, measures() if measures else None, progress)
    return write_report(run, results)
