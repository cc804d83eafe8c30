"""Line charts drawn with PIL: quality against seconds per image, one line per sampler.

No plotting library is needed: `line_chart` draws axes with "nice" ticks
(1-2-5 steps; decades on a log axis), grid lines, labelled axes, a title,
one coloured line with markers per series, a small label at each point (the
step count, in the evaluation plots) and a legend.

`write_quality_plots` makes one chart per (quality measure, guidance scale)
from the evaluation results: x = seconds per image (a log axis when the
times span more than a factor of 10), y = the measure, one line per sampler
through its step counts.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw

from latent_diffusion.formats.pngmeta import save_png
from latent_diffusion.evaluation.grids import default_font

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
SIZE = (860, 540)
MARGINS = dict(left=84, right=200, top=48, bottom=70)  # the legend sits in the right margin
GRID_COLOUR, AXIS_COLOUR, TEXT = (225, 225, 225), (60, 60, 60), (20, 20, 20)

# (key in the results, axis label, fixed y range or None)
QUALITY_MEASURES = (
    ("adherence", "Shapes adherence, overall (higher is better)", (-0.03, 1.03)),
    ("held_out", "Shapes adherence, held-out pairs (higher is better)", (-0.03, 1.03)),
    ("fid", "FID (lower is better)", None),
    ("fd_clip", "FD-CLIP (lower is better)", None),
    ("clip_score", "CLIP score (higher is better)", None),
)


@dataclasses.dataclass
class Series:
    """One line: a legend label and its points (x, y, label drawn next to the point), joined in this order."""

    label: str
    points: list[tuple[float, float, str]]


# ---------------------------------------------------------------- ticks and scales


def nice_step(span: float, count: int = 5) -> float:
    """1, 2 or 5 times a power of ten, the nearest to span / count on a log scale."""
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    return min((m * power for m in (1, 2, 5, 10)), key=lambda step: abs(math.log(step / raw)))


def linear_ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = nice_step(high - low, count)
    first = math.ceil(low / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(high / step + 1e-9) + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """Decades in [low, high]; with 2 and 5 times each decade when fewer than three decades fit."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for multiples in ((1,), (1, 2, 5), (1, 1.5, 2, 3, 5, 7)):
        ticks = [m * 10**d for d in decades for m in multiples if low <= m * 10**d <= high]
        if len(ticks) >= 3:
            return ticks
    return ticks


def format_tick(value: float) -> str:
    return f"{value:.3g}"


def padded_range(values: Sequence[float], log: bool) -> tuple[float, float]:
    """The data range with a margin: a factor 1.25 on a log axis, 8% of the span (or ±1 / ±10%) on a linear one."""
    low, high = min(values), max(values)
    if log:
        return low / 1.25, high * 1.25
    pad = (high - low) * 0.08 or (abs(high) * 0.1 or 1.0)
    return low - pad, high + pad


@dataclasses.dataclass
class Axes:
    """Maps data (x, y) to pixels inside the plot box (left, top, right, bottom)."""

    box: tuple[int, int, int, int]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    log_x: bool

    def _fraction_x(self, x: float) -> float:
        low, high = self.x_range
        if self.log_x:
            return (math.log10(x) - math.log10(low)) / (math.log10(high) - math.log10(low))
        return (x - low) / (high - low)

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        fy = (y - self.y_range[0]) / (self.y_range[1] - self.y_range[0])
        return left + self._fraction_x(x) * (right - left), bottom - fy * (bottom - top)


# ---------------------------------------------------------------- drawing


def _draw_x_axis(draw: ImageDraw.ImageDraw, axes: Axes, label: str, font) -> None:
    left, top, right, bottom = axes.box
    ticks = log_ticks(*axes.x_range) if axes.log_x else linear_ticks(*axes.x_range)
    for x in ticks:
        px, _ = axes.to_pixel(x, axes.y_range[0])
        draw.line([(px, top), (px, bottom)], fill=GRID_COLOUR)
        draw.line([(px, bottom), (px, bottom + 5)], fill=AXIS_COLOUR)
        draw.text((px, bottom + 8), format_tick(x), fill=TEXT, font=font, anchor="mt")
    scale = " (log scale)" if axes.log_x else ""
    draw.text(((left + right) / 2, bottom + 40), label + scale, fill=TEXT, font=font, anchor="mt")


def _draw_y_axis(image: Image.Image, axes: Axes, label: str, font) -> None:
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = axes.box
    for y in linear_ticks(*axes.y_range):
        _, py = axes.to_pixel(axes.x_range[0], y)
        draw.line([(left, py), (right, py)], fill=GRID_COLOUR)
        draw.line([(left - 5, py), (left, py)], fill=AXIS_COLOUR)
        draw.text((left - 8, py), format_tick(y), fill=TEXT, font=font, anchor="rm")
    width = int(draw.textlength(label, font=font)) + 8
    text = Image.new("RGB", (width, 22), (255, 255, 255))
    ImageDraw.Draw(text).text((4, 3), label, fill=TEXT, font=font)
    rotated = text.rotate(90, expand=True)
    image.paste(rotated, (8, int((top + bottom) / 2 - rotated.height / 2)))


def _draw_series(draw: ImageDraw.ImageDraw, axes: Axes, series: Series, colour, font) -> None:
    pixels = [axes.to_pixel(x, y) for x, y, _ in series.points]
    if len(pixels) > 1:
        draw.line(pixels, fill=colour, width=3, joint="curve")
    for (px, py), (_, _, text) in zip(pixels, series.points):
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour, outline=(255, 255, 255))
        draw.text((px + 7, py - 7), text, fill=colour, font=font, anchor="lb")


def _draw_legend(draw: ImageDraw.ImageDraw, axes: Axes, series: Sequence[Series], font, title: str) -> None:
    x, y = axes.box[2] + 18, axes.box[1] + 4
    draw.text((x, y), title, fill=TEXT, font=font)
    for i, s in enumerate(series):
        yy = y + 24 * (i + 1) + 8
        draw.line([(x, yy), (x + 26, yy)], fill=PALETTE[i % len(PALETTE)], width=3)
        draw.ellipse([x + 9, yy - 4, x + 17, yy + 4], fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 34, yy), s.label, fill=TEXT, font=font, anchor="lm")


def line_chart(series: Sequence[Series], title: str, x_label: str, y_label: str, *, log_x: Optional[bool] = None,
               y_range: Optional[tuple[float, float]] = None, legend_title: str = "",
               size: tuple[int, int] = SIZE) -> Image.Image:
    """An RGB chart of `series` (at least one point in all); `log_x=None` picks a log x axis for spans > 10x."""
    xs = [x for s in series for x, _, _ in s.points]
    ys = [y for s in series for _, y, _ in s.points]
    if not xs:
        raise ValueError("line_chart needs at least one point")
    if log_x is None:
        log_x = min(xs) > 0 and max(xs) / min(xs) > 10
    box = (MARGINS["left"], MARGINS["top"], size[0] - MARGINS["right"], size[1] - MARGINS["bottom"])
    axes = Axes(box, padded_range(xs, log_x), y_range or padded_range(ys, False), log_x)
    image = Image.new("RGB", size, (255, 255, 255))
    draw, font, small = ImageDraw.Draw(image), default_font(14), default_font(12)
    draw.text((size[0] / 2, 14), title, fill=TEXT, font=default_font(16), anchor="mt")
    _draw_x_axis(draw, axes, x_label, font)
    _draw_y_axis(image, axes, y_label, font)
    draw.rectangle(box, outline=AXIS_COLOUR)
    for i, s in enumerate(series):
        _draw_series(draw, axes, s, PALETTE[i % len(PALETTE)], small)
    _draw_legend(draw, axes, series, font, legend_title)
    return image


# ---------------------------------------------------------------- evaluation plots


def measure_value(result: dict, key: str) -> Optional[float]:
    """A setting's number for a QUALITY_MEASURES key; Shapes adherence lives under result["shapes"]."""
    shapes = result.get("shapes") or {}
    return {"adherence": shapes.get("overall"), "held_out": shapes.get("held_out")}.get(key, result.get(key))


def sampler_series(results: Sequence[dict], key: str, guidance: float) -> list[Series]:
    """One Series per sampler (in order of first appearance): (seconds/image, value, steps) at `guidance`,
    joined in order of steps."""
    by_sampler: dict[str, list] = {}
    for r in results:
        value = measure_value(r, key)
        if r["guidance"] == guidance and value is not None and r.get("seconds_per_image"):
            by_sampler.setdefault(r["sampler"], []).append((r["seconds_per_image"], value, f"{r['steps']}"))
    return [Series(sampler, sorted(points, key=lambda p: int(p[2]))) for sampler, points in by_sampler.items()]


def write_quality_plots(results: Sequence[dict], folder: Path) -> list[Path]:
    """plots/<measure>-vs-seconds-w<guidance>.png for each measure with numbers; returns the paths written."""
    folder = Path(folder)
    paths = []
    for guidance in sorted({r["guidance"] for r in results}):
        for key, label, y_range in QUALITY_MEASURES:
            series = sampler_series(results, key, guidance)
            if not series:
                continue
            chart = line_chart(series, f"{label.split(' (')[0]} vs. time, guidance w = {guidance:g}",
                               "seconds per image", label, y_range=y_range, legend_title="sampler (points: steps)")
            paths.append(save_png(chart, folder / f"{key}-vs-seconds-w{guidance:g}.png", {}))
    return paths

