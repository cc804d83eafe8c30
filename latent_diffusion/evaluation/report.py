"""`latent-diffusion eval`: generate, score and report one model over a grid of sampler settings.

A *setting* is (sampler, steps, guidance scale). For every setting the model
draws one image per (prompt, seed); the images are scored and summarised.
The pipeline is passed in (the library never imports it), so any object with
the `LatentDiffusionPipeline` call signature works.

The evaluation folder (`--out`):

    run.json                          what was asked: model, size, prompts, seeds, settings
    images/<setting>/p0003-s0.png     one image per (setting, prompt index, seed), written atomically
    images/<setting>/timings.jsonl    one line per generated batch: its files, seconds, peak memory
    results.json                      every number, and a judgement per image
    report.md                         the summary table, notes, links to grids and plots
    grids/<setting>.png, grids/comparison.png
    plots/<measure>-vs-seconds-w<guidance>.png

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

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from PIL import Image, PngImagePlugin

from ..samplers import SAMPLER_NAMES
from ..shapes import evaluation_prompts, parse_prompt, score_images
from ..shapes.scorer import REPORT_KEYS
from .resources import MIB, RSSPeakSampler

SEED_STRIDE = 1_000_003  # image_seed(i, k) = SEED_STRIDE * k + i
CATEGORY_KEYS = tuple(key for key in REPORT_KEYS if key not in ("overall", "held_out"))
VERDICT_FIELD = "shapes_correct"


# ---------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way of sampling: sampler name, number of steps, classifier-free guidance scale."""

    sampler: str
    steps: int
    guidance: float

    @property
    def name(self) -> str:
        """Folder and file name: "dpmpp-20-w7.5"."""
        return f"{self.sampler.replace('+', 'p')}-{self.steps}-w{self.guidance:g}"

    @property
    def label(self) -> str:
        return f"{self.sampler} {self.steps} steps, w={self.guidance:g}"

    def as_dict(self) -> dict:
        return dict(name=self.name, sampler=self.sampler, steps=self.steps, guidance=self.guidance)


def check_samplers(samplers: Iterable[str], flag: str = "--samplers") -> list[str]:
    samplers = list(samplers)
    unknown = [s for s in samplers if s not in SAMPLER_NAMES]
    if unknown or not samplers:
        raise ValueError(f"{flag}: unknown sampler(s) {unknown}; choose from {', '.join(SAMPLER_NAMES)}")
    return samplers


def check_steps(steps: Iterable[int], flag: str = "--steps") -> list[int]:
    steps = list(steps)
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad or not steps:
        raise ValueError(f"{flag}: step counts must be integers >= 1; got {bad or steps}")
    return steps


def check_guidance(guidance: Iterable[float], flag: str = "--guidance") -> list[float]:
    guidance = [float(g) for g in guidance]
    bad = [g for g in guidance if not g >= 0]
    if bad or not guidance:
        raise ValueError(f"{flag}: guidance scales must be >= 0; got {bad or guidance}")
    return guidance


def parse_sampler_steps(spec: str) -> tuple[str, list[int]]:
    """"ddpm:1000,250,50" -> ("ddpm", [1000, 250, 50]); errors name --settings."""
    sampler, colon, steps = spec.partition(":")
    if not colon or not steps:
        raise ValueError(f"--settings: expected SAMPLER:STEPS[,STEPS...] such as ddim:50,20; got {spec!r}")
    check_samplers([sampler], "--settings")
    try:
        counts = [int(s) for s in steps.split(",")]
    except ValueError:
        raise ValueError(f"--settings: step counts in {spec!r} must be integers") from None
    return sampler, check_steps(counts, "--settings")


@dataclasses.dataclass(frozen=True)
class SettingsRequest:
    """The settings asked for, checked before any model is loaded; None fields take the model's defaults.

    Either a grid (samplers × steps × guidance) or paired lists (sampler:steps...) × guidance.
    """

    samplers: Optional[tuple[str, ...]] = None
    steps: Optional[tuple[int, ...]] = None
    guidance: Optional[tuple[float, ...]] = None
    pairs: Optional[tuple[tuple[str, tuple[int, ...]], ...]] = None

    @classmethod
    def from_lists(cls, samplers=None, steps=None, guidance=None, pairs=None) -> "SettingsRequest":
        """Check each list (errors name its flag); `pairs` are "sampler:steps,steps" strings."""
        if pairs and (samplers or steps):
            raise ValueError("give either --settings SAMPLER:STEPS,... or --samplers/--steps, not both")
        return cls(
            samplers=tuple(check_samplers(samplers)) if samplers is not None else None,
            steps=tuple(check_steps(steps)) if steps is not None else None,
            guidance=tuple(check_guidance(guidance)) if guidance is not None else None,
            pairs=tuple((s, tuple(n)) for s, n in map(parse_sampler_steps, pairs)) if pairs else None,
        )

    def settings(self, defaults: dict) -> list[Setting]:
        """The settings, in order, duplicates dropped; `defaults` holds sampler, num_inference_steps, guidance_scale."""
        guidance = self.guidance or (float(defaults["guidance_scale"]),)
        if self.pairs:
            sampler_steps = [(s, n) for s, counts in self.pairs for n in counts]
        else:
            samplers = self.samplers or (defaults["sampler"],)
            steps = self.steps or (int(defaults["num_inference_steps"]),)
            sampler_steps = [(s, n) for s in samplers for n in steps]
        settings = [Setting(s, n, g) for s, n in sampler_steps for g in guidance]
        return list(dict.fromkeys(settings))


# ---------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
    """A prompt of the evaluation set; `shapes` when it parses in the Shapes grammar (then it is scored)."""

    index: int
    text: str
    categories: tuple[str, ...] = ()
    shapes: bool = False

    def as_dict(self) -> dict:
        return dict(index=self.index, prompt=self.text, categories=list(self.categories), shapes=self.shapes)


def is_shapes_prompt(text: str) -> bool:
    try:
        parse_prompt(text)
    except ValueError:
        return False
    return True


def make_prompt(index: int, text: str, categories: Sequence[str] = ()) -> EvalPrompt:
    """An EvalPrompt; a Shapes prompt takes its categories from the grammar, others keep the given ones."""
    try:
        return EvalPrompt(index, text, parse_prompt(text).categories, True)
    except ValueError:
        return EvalPrompt(index, text, tuple(categories), False)


def shapes_eval_prompts(num: int, seed: int = 0) -> list[EvalPrompt]:
    """`num` balanced Shapes prompts (`latent_diffusion.shapes.evaluation_prompts`)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"--num-prompts must be an integer >= 1; got {num!r}")
    return [EvalPrompt(i, text, tuple(cats), True) for i, (text, cats) in enumerate(evaluation_prompts(num, seed))]


def _jsonl_prompt(path: Path, line_number: int, line: str) -> tuple[str, tuple[str, ...]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"--prompts {str(path)!r} line {line_number}: not JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"--prompts {str(path)!r} line {line_number}: each JSONL line needs a \"prompt\" string")
    categories = record.get("categories") or ()
    return record["prompt"], (categories,) if isinstance(categories, str) else tuple(map(str, categories))


def load_prompt_file(path: str | os.PathLike) -> list[EvalPrompt]:
    """Prompts from a text file (one per line; blank lines and lines starting with # skipped) or a JSONL file
    of {"prompt": ..., "categories": [...]} (a .jsonl name, or a first line starting with "{")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts file not found: {str(path)!r}")
    lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"--prompts file {str(path)!r} holds no prompts")
    jsonl = path.suffix == ".jsonl" or lines[0][1].startswith("{")
    entries = [_jsonl_prompt(path, n, line) if jsonl else (line, ()) for n, line in lines]
    return [make_prompt(i, text, categories) for i, (text, categories) in enumerate(entries)]


# ---------------------------------------------------------------- the run and its folder


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
            raise ValueError(f"--batch-size must be >= 1; got {self.batch_size}")

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
            raise FileNotFoundError(f"--out {str(out_dir)!r} holds no run.json; run the evaluation first")
        m = json.loads(path.read_text())
        return cls(out_dir=Path(out_dir), model=m["model"], height=m["height"], width=m["width"], seeds=m["seeds"],
                   batch_size=m["batch_size"],
                   settings=[Setting(s["sampler"], s["steps"], s["guidance"]) for s in m["settings"]],
                   prompts=[EvalPrompt(p["index"], p["prompt"], tuple(p["categories"]), p["shapes"])
                            for p in m["prompts"]])


def write_atomic(path: Path, text: str) -> Path:
    """Write to a temporary name, then rename: readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def save_png_atomic(image: Image.Image, path: Path, metadata: dict[str, str]) -> Path:
    """`image` as a PNG with text metadata, written to a temporary name and renamed."""
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def prepare_out_dir(run: EvalRun) -> None:
    """Refuse a folder holding another model's, size's or prompt list's images; then record this run."""
    path = run.out_dir / "run.json"
    if path.is_file():
        old, new = json.loads(path.read_text()), run.manifest()
        old_prompts = [p["prompt"] for p in old.get("prompts", [])]
        differences = [key for key in ("model", "height", "width") if old.get(key) != new[key]]
        differences += ["prompts"] if old_prompts != [p.text for p in run.prompts] else []
        if differences:
            raise ValueError(
                f"--out {str(run.out_dir)!r} holds an evaluation with different {', '.join(differences)}; "
                "use another --out folder, or delete this one"
            )
    write_atomic(path, json.dumps(run.manifest(), indent=2) + "\n")


# ---------------------------------------------------------------- timings and memory


def append_timing(folder: Path, record: dict) -> None:
    """Append one JSON line to folder/timings.jsonl, flushed to disk; a torn last line from a crash is fenced off."""
    path = folder / "timings.jsonl"
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        f.write(("\n" if torn else "") + json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_timings(folder: Path) -> list[dict]:
    """The batch records of folder/timings.jsonl; unreadable (torn) lines are skipped."""
    path = folder / "timings.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def timing_summary(records: Sequence[dict]) -> dict:
    """Seconds per image (total timed seconds / timed images) and the peak memory over the batches."""
    images = sum(len(r["files"]) for r in records)
    if not images:
        return dict(seconds_per_image=None, timed_images=0, peak_memory_bytes=None, memory_kind=None, batches=0)
    return dict(
        seconds_per_image=sum(r["seconds"] for r in records) / images,
        timed_images=images,
        peak_memory_bytes=max(r["peak_bytes"] for r in records),
        peak_increase_bytes=max(r.get("peak_increase_bytes", 0) for r in records),
        memory_kind=records[-1]["memory_kind"],
        device=records[-1].get("device"),
        torch_threads=records[-1].get("torch_threads"),
        batches=len(records),
    )


class PeakMemory:
    """Context manager: peak memory while open; CUDA max allocated, or the sampled process RSS on CPU."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_approx"
        self.peak = self.increase = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            self._sampler = RSSPeakSampler().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.increase = self.peak - self._baseline
        else:
            self._sampler.__exit__(*exc)
            self.peak, self.increase = self._sampler.peak, max(self._sampler.peak - self._sampler.baseline, 0)


# ---------------------------------------------------------------- generation


def _call_pipeline(pipe, run: EvalRun, setting: Setting, items: Sequence[tuple[EvalPrompt, int]], steps=None):
    generators = [torch.Generator().manual_seed(image_seed(p.index, s)) for p, s in items]
    return pipe([p.text for p, _ in items], num_inference_steps=steps or setting.steps,
                guidance_scale=setting.guidance, sampler=setting.sampler, generator=generators,
                height=run.height, width=run.width, output_type="pil").images


def _png_metadata(run: EvalRun, setting: Setting, prompt: EvalPrompt, seed: int) -> dict[str, str]:
    return dict(prompt=prompt.text, negative_prompt="", seed=str(image_seed(prompt.index, seed)),
                sampler=setting.sampler, steps=str(setting.steps), guidance=str(setting.guidance),
                height=str(run.height), width=str(run.width), model=run.model,
                eval_prompt_index=str(prompt.index), eval_seed=str(seed))


def generate_batch(pipe, run: EvalRun, setting: Setting, items: Sequence[tuple[EvalPrompt, int]]) -> None:
    """Generate, time and save one batch; its images are written before its timing line."""
    device = torch.device(getattr(pipe, "device", "cpu"))
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        images = _call_pipeline(pipe, run, setting, items)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    files = []
    for image, (prompt, seed) in zip(images, items):
        path = save_png_atomic(image, run.image_path(setting, prompt, seed), _png_metadata(run, setting, prompt, seed))
        files.append(path.name)
    append_timing(run.setting_dir(setting), dict(
        files=files, seconds=seconds, peak_bytes=int(memory.peak), peak_increase_bytes=int(memory.increase),
        memory_kind=memory.kind, device=str(device), torch_threads=torch.get_num_threads(), batch_size=len(items)))


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def generate_missing(pipe, run: EvalRun, progress: bool = True) -> int:
    """Generate every image not yet on disk (one tqdm bar over the whole run); returns how many were made."""
    from tqdm.auto import tqdm

    todo = {setting: run.pending(setting) for setting in run.settings}
    total = len(run.settings) * len(run.items())
    remaining = sum(map(len, todo.values()))
    with tqdm(total=total, initial=total - remaining, desc="eval: generating", unit="image",
              disable=not progress) as bar:
        if remaining:
            first = next(s for s, items in todo.items() if items)
            _call_pipeline(pipe, run, first, todo[first][: run.batch_size], steps=1)  # untimed warm-up
        for setting, items in todo.items():
            for batch in _batches(items, run.batch_size):
                bar.set_postfix_str(setting.label)
                generate_batch(pipe, run, setting, batch)
                bar.update(len(batch))
    return remaining


# ---------------------------------------------------------------- quality measures


class QualityMeasures:
    """FID, FD-CLIP and CLIP score where their inputs are given; otherwise a note saying what is missing.

    `reference`: a folder of real images or an .npz of saved statistics; `clip`: a transformers CLIP folder;
    `fid_weights`: the FID Inception weights file (default: $LATENT_DIFFUSION_FID_WEIGHTS).
    """

    def __init__(self, reference=None, clip=None, fid_weights=None, device=None):
        self.reference, self.device, self.notes = reference, device, []
        self.fid = self._fid(fid_weights) if reference is not None else None
        self.clip_scorer, clip_embedder = self._clip(clip) if clip is not None else (None, None)
        self.fd_clip = self._reference_pair(clip_embedder) if clip_embedder is not None and reference else None
        if reference is None:
            self.notes.append("FID and FD-CLIP: not computed; give --reference DIR (real images, e.g. "
                              "`latent-diffusion shapes-export DIR --split all --size S`, or an .npz of statistics).")
        if clip is None:
            self.notes.append("CLIP score and FD-CLIP: not computed; give --clip PATH "
                              "(a transformers CLIP model folder).")

    def _reference_pair(self, extractor):
        """(extractor, (mu, sigma) of the reference), or None with a note when the reference cannot be read."""
        from .fid import measure_name, reference_statistics

        try:
            return extractor, reference_statistics(self.reference, extractor)
        except (ValueError, FileNotFoundError) as error:
            self.notes.append(f"{measure_name(extractor)}: not computed; --reference: {error}")
            return None

    def _fid(self, weights):
        from .inception import FIDWeightsNotFoundError, load_fid_inception

        try:
            return self._reference_pair(load_fid_inception(weights, device=self.device))
        except FIDWeightsNotFoundError as error:
            self.notes.append(f"FID: not computed. {error}")
            return None

    def _clip(self, clip):
        """(CLIPScorer or None, image embedder); a vision-only CLIP folder gives FD-CLIP but no CLIP score."""
        from .clip_score import CLIPImageEmbedder, CLIPScorer

        try:
            scorer = CLIPScorer(clip, device=self.device)
            return scorer, scorer.embedder
        except ValueError as error:
            self.notes.append(f"CLIP score: not computed; --clip: {error}")
            return None, CLIPImageEmbedder(clip, device=self.device)

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Optional[float]]:
        """{"fid", "fd_clip", "clip_score"}: numbers, or None where not computed."""
        return dict(fid=self._frechet(self.fid, images), fd_clip=self._frechet(self.fd_clip, images),
                    clip_score=self.clip_scorer(images, list(prompts)) if self.clip_scorer and images else None)

    def _frechet(self, pair, images) -> Optional[float]:
        from .fid import compute_fid

        if pair is None or len(images) < 2:
            return None
        extractor, statistics = pair
        return compute_fid(images, statistics, extractor=extractor)


# ---------------------------------------------------------------- scoring


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


# ---------------------------------------------------------------- the report


def _accuracy_cell(shapes: Optional[dict], key: str) -> str:
    if not shapes or shapes.get(key) is None:
        return "-"
    return f"{shapes[key]:.3f} ({shapes['correct'][key]}/{shapes['counts'][key]})"


def _number_cell(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_row(result: dict) -> str:
    """One markdown table row of a setting's numbers."""
    peak = result.get("peak_memory_bytes")
    cells = [result["label"], _number_cell(result.get("seconds_per_image"), 4),
             "-" if peak is None else f"{peak / MIB:.0f}",
             _accuracy_cell(result["shapes"], "overall"),
             *[_accuracy_cell(result["shapes"], key) for key in CATEGORY_KEYS],
             _accuracy_cell(result["shapes"], "held_out"),
             _number_cell(result["fid"], 2), _number_cell(result["fd_clip"], 2), _number_cell(result["clip_score"], 2)]
    return "| " + " | ".join(cells) + " |"


def _method_lines(results: dict) -> list[str]:
    timed = next((r for r in results["results"] if r.get("timed_images")), {})
    shapes_prompts = sum(p["shapes"] for p in results["prompts"])
    memory = {"cuda_max_allocated": "torch.cuda.max_memory_allocated (tensors on the GPU)",
              "cpu_rss_approx": "the process's resident set size, sampled (CPU; includes the loaded model)"}
    return [
        f"- model: `{results['model']}`",
        f"- images: {results['height']}×{results['width']}; {len(results['prompts'])} prompts "
        f"({shapes_prompts} in the Shapes grammar, scored) × {len(results['seeds'])} seed(s) per setting",
        f"- seconds/image: wall time of each pipeline call on batches of up to {results['batch_size']} images "
        "(consecutive prompts, one seed) after one untimed warm-up call, divided by the images in the batch; "
        "text encoding, sampling and VAE decoding included, PNG writing and scoring excluded"
        + (f"; device {timed['device']}, {timed['torch_threads']} torch threads" if timed else ""),
        f"- peak memory: the maximum over the setting's batches of {memory.get(timed.get('memory_kind'), 'n/a')}",
        "- adherence: the fraction of images the Shapes judge finds exactly as prompted (count in brackets); "
        "overall and the categories leave out prompts with a held-out colour-shape pair, reported apart",
    ]


def _note_lines(note: str) -> list[str]:
    """A markdown bullet; a multi-line note keeps its lines in an indented code block under the first."""
    first, *rest = note.splitlines()
    return [f"- {first}"] + (["  ```", *[f"  {line}" for line in rest], "  ```"] if rest else [])


def markdown_report(results: dict, grids: Sequence[Path], plots: Sequence[Path]) -> str:
    """report.md: method, the summary table, notes, links to the grids and plots."""
    out_dir = Path(results.get("out_dir", "."))
    header = ["setting", "s/image", "peak MiB", "adherence", *CATEGORY_KEYS, "held-out", "FID", "FD-CLIP", "CLIP score"]
    lines = ["# Evaluation report", "", *_method_lines(results), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [summary_row(r) for r in results["results"]]
    lines += ["", "## Notes", ""] + [line for note in results["notes"] or ["none"] for line in _note_lines(note)]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots]
    lines += ["", "## Grids", "", "Frames: green = judged correct, red = not, gray = not a Shapes prompt.", ""]
    lines += [f"![{g.stem}]({g.relative_to(out_dir).as_posix()})" for g in grids]
    return "\n".join(lines) + "\n"


def write_report(run: EvalRun, results: dict) -> list[Path]:
    """Write grids, plots, results.json and report.md into run.out_dir; returns [report.md, results.json, ...]."""
    from .grids import write_grids
    from .plots import write_quality_plots

    grids = write_grids(run, results["results"])
    plots = write_quality_plots(results["results"], run.out_dir / "plots")
    json_path = write_atomic(run.out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    markdown = markdown_report(dict(results, out_dir=str(run.out_dir)), grids, plots)
    report_path = write_atomic(run.out_dir / "report.md", markdown)
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
    """Score the saved images and write the report, without the model (`run` may be an --out folder)."""
    run = run if isinstance(run, EvalRun) else EvalRun.from_manifest(run)
    results = collect_results(run, measures() if measures else None, progress)
    return write_report(run, results)

