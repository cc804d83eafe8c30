"""Image grids for evaluation reports, drawn with PIL: one per setting, and one comparing the settings.

Each cell is an image in a coloured frame showing the Shapes judge's verdict
(green: correct, red: not, gray: not a Shapes prompt). Small images are
enlarged with nearest-neighbour resampling so that 32-px samples stay
readable; titles and row labels use PIL's default font.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from latent_diffusion.formats.pngmeta import save_png

FRAME_COLOURS = {True: (40, 170, 60), False: (210, 50, 40), None: (150, 150, 150)}
FRAME = 3  # pixels of frame around each cell
MIN_CELL = 96  # images smaller than this are enlarged (nearest) to it
MAX_GRID_IMAGES = 64  # per-setting grids show the first 64 images
COMPARISON_COLUMNS = 8  # the comparison grid shows each setting's first 8 images
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def default_font(size: int = 14) -> ImageFont.ImageFont:
    """PIL's built-in font (scalable where PIL has FreeType, else the fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def cell_size(image: Image.Image) -> tuple[int, int]:
    """The drawn size of an image: enlarged by an integer factor until its shorter side reaches MIN_CELL."""
    factor = max(1, math.ceil(MIN_CELL / min(image.size)))
    return image.width * factor, image.height * factor


def framed(image: Image.Image, verdict: Optional[bool], size: tuple[int, int]) -> Image.Image:
    """`image` resized to `size` (nearest) inside a FRAME-pixel border coloured by `verdict`."""
    cell = Image.new("RGB", (size[0] + 2 * FRAME, size[1] + 2 * FRAME), FRAME_COLOURS[verdict])
    cell.paste(image.convert("RGB").resize(size, Image.Resampling.NEAREST), (FRAME, FRAME))
    return cell


def _text_height(font, text: str = "Ag") -> int:
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return bottom - top


def image_grid(images: Sequence[Image.Image], verdicts: Sequence[Optional[bool]], columns: int,
               title: str = "") -> Image.Image:
    """Framed images row by row under a title line; all cells take the first image's drawn size."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    size = cell_size(images[0])
    cells = [framed(image, verdict, size) for image, verdict in zip(images, verdicts)]
    cw, ch = cells[0].size
    font = default_font()
    header = _text_height(font) + 12 if title else 0
    columns = min(columns, len(cells))
    rows = math.ceil(len(cells) / columns)
    title_width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 12 if title else 0
    grid = Image.new("RGB", (max(columns * cw, title_width), header + rows * ch), BACKGROUND)
    if title:
        ImageDraw.Draw(grid).text((6, 4), title, fill=TEXT, font=font)
    for i, cell in enumerate(cells):
        grid.paste(cell, ((i % columns) * cw, header + (i // columns) * ch))
    return grid


def setting_grid(images: Sequence[Image.Image], verdicts: Sequence[Optional[bool]], title: str,
                 max_images: int = MAX_GRID_IMAGES) -> Image.Image:
    """A near-square grid of a setting's first `max_images` images, in (seed, prompt) order."""
    images, verdicts = list(images)[:max_images], list(verdicts)[:max_images]
    return image_grid(images, verdicts, columns=math.ceil(math.sqrt(len(images))), title=title)


def comparison_grid(rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[Optional[bool]]]],
                    columns: int = COMPARISON_COLUMNS) -> Image.Image:
    """One row per setting (label on the left), the same first `columns` (prompt, seed) images in each,
    under a title line."""
    font = default_font()
    strips = [image_grid(list(images)[:columns], list(verdicts)[:columns], columns) for _, images, verdicts in rows]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(draw.textlength(label, font=font) for label, _, _ in rows) + 12
    title = "Each row: one setting; each column: the same prompt and seed"
    width = max(int(label_width) + max(strip.width for strip in strips), int(draw.textlength(title, font=font)) + 12)
    header = _text_height(font) + 12
    grid = Image.new("RGB", (width, header + sum(strip.height for strip in strips)), BACKGROUND)
    canvas, y = ImageDraw.Draw(grid), header
    canvas.text((6, 4), title, fill=TEXT, font=font)
    for (label, _, _), strip in zip(rows, strips):
        canvas.text((6, y + strip.height // 2 - _text_height(font) // 2), label, fill=TEXT, font=font)
        grid.paste(strip, (int(label_width), y))
        y += strip.height
    return grid


def _setting_images(out_dir: Path, result: dict) -> tuple[list[Image.Image], list[Optional[bool]]]:
    images, verdicts = [], []
    for judgement in result["judgements"][:MAX_GRID_IMAGES]:
        with Image.open(out_dir / judgement["file"]) as image:
            images.append(image.convert("RGB"))
        verdicts.append(judgement["shapes_correct"])
    return images, verdicts


def write_grids(run, results: Sequence[dict]) -> list[Path]:
    """grids/<setting>.png for each setting with images, and grids/comparison.png; returns their paths."""
    folder = Path(run.out_dir) / "grids"
    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for result in results:
        images, verdicts = _setting_images(Path(run.out_dir), result)
        if not images:
            continue
        title = f"{result['label']}: {len(result['judgements'])} images"
        paths.append(save_png(setting_grid(images, verdicts, title), folder / f"{result['name']}.png", {}))
        rows.append((result["label"], images, verdicts))
    if rows:
        paths.insert(0, save_png(comparison_grid(rows), folder / "comparison.png", {}))
    return paths

