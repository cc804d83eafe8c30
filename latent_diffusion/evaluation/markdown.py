"""report.md: the method, the summary table of every setting, notes, and links to the grids and plots."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from latent_diffusion.shapes.scorer import REPORT_KEYS
from latent_diffusion.evaluation.resources import MIB

CATEGORY_KEYS = tuple(key for key in REPORT_KEYS if key not in ("overall", "held_out"))


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
