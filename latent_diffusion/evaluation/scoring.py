"""Scoring an evaluation's saved images: Shapes adherence and a judgement per image, FID and CLIP score
where `QualityMeasures` has them, and the timings, gathered into `results.json`'s content.

Everything is computed from what is on disk (images and timings), so a finished run can be scored
again without the model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from latent_diffusion.shapes import score_images
from latent_diffusion.shapes.scorer import REPORT_KEYS
from latent_diffusion.evaluation.prompts import EvalPrompt, is_shapes_prompt
from latent_diffusion.evaluation.quality import QualityMeasures
from latent_diffusion.evaluation.run_folder import EvalRun
from latent_diffusion.evaluation.settings import Setting
from latent_diffusion.evaluation.timings import read_timings, timing_summary

VERDICT_FIELD = "shapes_correct"


def shapes_adherence(images: Sequence, prompts: Sequence[str]) -> dict[str, float]:
    """Shapes adherence of the (image, prompt) pairs whose prompt parses in the Shapes grammar:
    {"adherence": overall, "adherence_<category>": ..., "adherence_held_out": ...}; keys with no prompts left out."""
    pairs = [(image, prompt) for image, prompt in zip(images, prompts) if is_shapes_prompt(prompt)]
    if not pairs:
        return {}
    report = score_images([image for image, _ in pairs], [prompt for _, prompt in pairs])
    return {("adherence" if key == "overall" else f"adherence_{key}"): report[key]
            for key in REPORT_KEYS if report[key] is not None}


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def judge_images(items: Sequence[tuple[EvalPrompt, int, Path]], images: Sequence[Image.Image]):
    """(score_images report of the Shapes prompts or None, one judgement dict per image)."""
    scored = [i for i, (prompt, _, _) in enumerate(items) if prompt.shapes]
    report = score_images([images[i] for i in scored], [items[i][0].text for i in scored]) if scored else None
    reasons = {scored[f["index"]]: f["reasons"] for f in report["failures"]} if report else {}
    judgements = []
    for i, (prompt, seed, path) in enumerate(items):
        verdict = (i not in reasons) if prompt.shapes else None
        judgements.append({"prompt_index": prompt.index, "seed": seed, "file": str(path), "prompt": prompt.text,
                           "categories": list(prompt.categories), VERDICT_FIELD: verdict,
                           "reasons": reasons.get(i, [])})
    return report, judgements


def score_setting(run: EvalRun, setting: Setting, measures: Optional[QualityMeasures]) -> dict:
    """Every number of one setting, from its saved images and timings."""
    items = [(p, s, run.image_path(setting, p, s)) for p, s in run.items()]
    items = [item for item in items if item[2].is_file()]
    images = [_load_rgb(path) for _, _, path in items]
    shapes, judgements = judge_images(items, images)
    quality = measures.scores(images, [p.text for p, _, _ in items]) if measures else {}
    for judgement in judgements:
        judgement["file"] = os.path.relpath(judgement["file"], run.out_dir)
    return dict(setting.as_dict(), label=setting.label, images=len(items), expected_images=len(run.items()),
                **timing_summary(read_timings(run.setting_dir(setting))),
                shapes={k: v for k, v in shapes.items() if k != "failures"} if shapes else None,
                fid=quality.get("fid"), fd_clip=quality.get("fd_clip"), clip_score=quality.get("clip_score"),
                judgements=judgements)


def collect_results(run: EvalRun, measures: Optional[QualityMeasures], progress: bool = True) -> dict:
    """results.json's content: the run, notes and each setting's numbers and judgements."""
    from tqdm.auto import tqdm

    settings = [score_setting(run, s, measures) for s in tqdm(run.settings, desc="eval: scoring", unit="setting",
                                                              disable=not progress)]
    notes = list(measures.notes) if measures else ["FID, FD-CLIP and CLIP score: not computed (no measures)."]
    notes += [f"{s['label']}: {s['images']} of {s['expected_images']} images present (run again to finish)"
              for s in settings if s["images"] < s["expected_images"]]
    return dict(run.manifest(), notes=notes, results=settings)
