"""The evaluation run and its folder: what is generated where, and `run.json`, which guards the folder.

    run.json                          what was asked: model, size, prompts, seeds, settings
    images/<setting>/p0003-s0.png     one image per (setting, prompt index, seed)
    images/<setting>/timings.jsonl    one line per generated batch (`timings.py`)

A rerun into a folder holding another model's, size's or prompt list's images is refused rather than
mixed in; a rerun of the same run finds its finished images and skips them.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from latent_diffusion.formats.atomic import write_text_atomic
from latent_diffusion.evaluation.errors import EvalArgumentError, EvalFileNotFoundError
from latent_diffusion.evaluation.prompts import EvalPrompt
from latent_diffusion.evaluation.settings import Setting

SEED_STRIDE = 1_000_003  # image_seed(i, k) = SEED_STRIDE * k + i


def image_seed(prompt_index: int, seed: int) -> int:
    """The generator seed of image `seed` of prompt `prompt_index`: distinct for every pair, stable across runs."""
    return SEED_STRIDE * seed + prompt_index


@dataclasses.dataclass
class EvalRun:
    """What one evaluation generates: settings × prompts × seeds, at one size, into `out_dir`."""

    out_dir: Path
    model: str
    settings: list[Setting]
    prompts: list[EvalPrompt]
    seeds: list[int]
    height: int
    width: int
    batch_size: int = 8

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        if not self.settings or not self.prompts or not self.seeds:
            raise ValueError("an evaluation needs at least one setting, one prompt and one seed")
        if self.batch_size < 1:
            raise EvalArgumentError("batch_size", f"must be >= 1; got {self.batch_size}")

    def setting_dir(self, setting: Setting) -> Path:
        return self.out_dir / "images" / setting.name

    def image_path(self, setting: Setting, prompt: EvalPrompt, seed: int) -> Path:
        return self.setting_dir(setting) / f"p{prompt.index:04d}-s{seed}.png"

    def items(self) -> list[tuple[EvalPrompt, int]]:
        """Every (prompt, seed), seed-major: a batch holds consecutive prompts with one seed."""
        return [(prompt, seed) for seed in self.seeds for prompt in self.prompts]

    def pending(self, setting: Setting) -> list[tuple[EvalPrompt, int]]:
        return [(p, s) for p, s in self.items() if not self.image_path(setting, p, s).is_file()]

    def manifest(self) -> dict:
        return dict(model=self.model, height=self.height, width=self.width, seeds=self.seeds,
                    batch_size=self.batch_size, image_seed=f"{SEED_STRIDE} * seed + prompt index",
                    settings=[s.as_dict() for s in self.settings], prompts=[p.as_dict() for p in self.prompts])

    @classmethod
    def from_manifest(cls, out_dir: str | os.PathLike) -> "EvalRun":
        """The run recorded in `out_dir/run.json` (for rebuilding a report without the model)."""
        path = Path(out_dir) / "run.json"
        if not path.is_file():
            raise EvalFileNotFoundError("out_dir", f"{str(out_dir)!r} holds no run.json; run the evaluation first")
        m = json.loads(path.read_text())
        return cls(out_dir=Path(out_dir), model=m["model"], height=m["height"], width=m["width"], seeds=m["seeds"],
                   batch_size=m["batch_size"],
                   settings=[Setting(s["sampler"], s["steps"], s["guidance"]) for s in m["settings"]],
                   prompts=[EvalPrompt(p["index"], p["prompt"], tuple(p["categories"]), p["shapes"])
                            for p in m["prompts"]])


def prepare_out_dir(run: EvalRun) -> None:
    """Refuse a folder holding another model's, size's or prompt list's images; then record this run."""
    path = run.out_dir / "run.json"
    if path.is_file():
        old, new = json.loads(path.read_text()), run.manifest()
        old_prompts = [p["prompt"] for p in old.get("prompts", [])]
        differences = [key for key in ("model", "height", "width") if old.get(key) != new[key]]
        differences += ["prompts"] if old_prompts != [p.text for p in run.prompts] else []
        if differences:
            raise EvalArgumentError(
                "out_dir", f"{str(run.out_dir)!r} holds an evaluation with different {', '.join(differences)}; "
                "use another folder, or delete this one")
    write_text_atomic(path, json.dumps(run.manifest(), indent=2) + "\n")
