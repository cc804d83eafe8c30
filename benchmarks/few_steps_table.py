"""Adherence against seconds per image across `latent-diffusion eval` runs: one markdown table and one plot.

    python benchmarks/few_steps_table.py teacher=runs/eval_teacher lcm=runs/eval_lcm \\
        [--timings runs/few_steps_eager.json [--timings runs/few_steps_traced.json]] --plot benchmarks/few_steps.png

Each NAME=FOLDER is an eval output folder (its results.json); every setting becomes a row, and the
settings of one (NAME, sampler, guidance) a line of the plot through their step counts. With
--timings (bench_few_steps.py's output), the plot's x axis is its batch-1 seconds per image, measured
interleaved in one process, instead of eval's batch timings, which the box's load at the time of each run
skews. Each --timings file (bench_few_steps.py --unet eager / traced / auto) adds a seconds and a ratio column,
labelled with its UNet regime; the first one is the plot's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from latent_diffusion.evaluation.plots import Series, line_chart
from latent_diffusion.formats.pngmeta import save_png


def load_rows(runs: list[tuple[str, Path]]) -> list[dict]:
    """One row per (run, setting): name, sampler, steps, guidance, adherence, counts, eval's seconds/image."""
    rows = []
    for name, folder in runs:
        results = json.loads((folder / "results.json").read_text())
        for r in results["results"]:
            shapes = r.get("shapes") or {}
            rows.append(dict(name=name, sampler=r["sampler"], steps=r["steps"], guidance=r["guidance"],
                             adherence=shapes.get("overall"), images=(shapes.get("counts") or {}).get("overall"), eval_seconds=r.get("seconds_per_image")))
    return rows


def setting_key(name: str, sampler: str, steps: int, guidance: float) -> str:
    """The key of a setting in bench_few_steps.py's JSON."""
    return f"{name}:{sampler}:{steps}:{guidance:g}"


def markdown_table(rows: list[dict], timing_sets: dict[str, dict]) -> str:
    """The rows as a markdown table; per timing set (label -> bench_few_steps.py's seconds), the batch-1 seconds
    and their ratio to the first row where measured."""
    first = setting_key(**{k: rows[0][k] for k in ("name", "sampler", "steps", "guidance")})
    head = "".join(f" s/image (batch 1, {label}) | × first row ({label}) |" for label in timing_sets)
    lines = [f"| model | sampler | steps | guidance | adherence | images | s/image (eval, batch) |{head}",
             "|---" * (7 + 2 * len(timing_sets)) + "|"]
    for r in rows:
        key = setting_key(r["name"], r["sampler"], r["steps"], r["guidance"])
        cells = ""
        for timings in timing_sets.values():
            one, base = timings.get(key), timings.get(first)
            cells += f" {f'{one:.4f}' if one else '–'} | {f'{one / base:.2f}' if one and base else '–'} |"
        lines.append(f"| {r['name']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['adherence']:.3f} "
                     f"| {r['images']} | {r['eval_seconds']:.4f} |{cells}")
    return "\n".join(lines)


def plot(rows: list[dict], timings: dict, path: Path) -> Path:
    """Adherence against seconds per image, one line per (run, sampler, guidance) through its step counts."""
    series: dict[str, list] = {}
    for r in rows:
        x = timings.get(setting_key(r["name"], r["sampler"], r["steps"], r["guidance"])) or r["eval_seconds"]
        if x and r["adherence"] is not None:
            label = f"{r['name']} {r['sampler']} w={r['guidance']:g}"
            series.setdefault(label, []).append((x, r["adherence"], str(r["steps"])))
    chart = line_chart([Series(k, sorted(v, key=lambda p: int(p[2]))) for k, v in series.items()],
                       "Embedded default: adherence vs. time", "seconds per image" + (" (batch 1)" if timings else ""),
                       "Shapes adherence, held-in (higher is better)", y_range=(-0.03, 1.03),
                       legend_title="(points: steps)")
    return save_png(chart, path, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=FOLDER of a latent-diffusion eval run")
    parser.add_argument("--timings", action="append", default=[],
                        help="bench_few_steps.py's JSON of batch-1 seconds per image (repeatable)")
    parser.add_argument("--plot", default="few_steps.png")
    args = parser.parse_args()
    runs = []
    for item in args.runs:
        name, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"runs: expected NAME=FOLDER, got {item!r}")
        runs.append((name, Path(folder)))
    files = [json.loads(Path(path).read_text()) for path in args.timings]
    timing_sets = {f.get("unet", "auto"): f["seconds"] for f in files}
    rows = load_rows(runs)
    print(markdown_table(rows, timing_sets))
    print(f"plot: {plot(rows, files[0]['seconds'] if files else {}, Path(args.plot))}")


if __name__ == "__main__":
    main()
