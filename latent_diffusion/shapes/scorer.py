"""A strict, GenEval-like scorer for Shapes images: detect the objects, judge them against the prompt, report.

No learned weights; plain numpy. The steps follow the spec's "Scoring" section:

1. Pixels: each pixel takes the nearest palette colour (Euclidean in sRGB,
   all nine colours).
2. Background: the commonest class on the one-pixel border. It must be one
   of BACKGROUNDS (a Shapes image never has another), and it is checked
   against the prompt's background phrase when there is one.
3. Objects: for each object colour (other than the background's), the mask
   of its pixels is first opened with a 3x3 square (eroded, then dilated),
   which removes specks and the one- or two-pixel fringes that blurred edges
   leave in some other palette colour (a blurred red edge on white is nearest
   to orange, for example). The opened mask's 4-connected components whose
   area is at least `MIN_AREA_FRACTION` * W * H are objects: a quarter of
   the smallest shape the world draws (a small triangle, 0.5 * 0.22^2 of
   the canvas), 25 px at S = 64, 99 px at S = 128 (never under 4 px). Each
   object's pixels are its opened component grown back by two pixels
   (`RECONSTRUCT_STEPS`) into the colour's own mask, which restores what the
   opening shaved off (corners, a triangle's apex) but not detached specks.
4. Geometry: centre = the bounding-box centre and side d = the larger
   bounding-box side, in fractions of the canvas.
5. Shape, from numbers of the object's pixels in its bounding box (w x h):
   aspect w / h; fill = area / (w h); top share = the fraction of the area
   in the top half; top and bottom corners = the filled fraction of the
   box's corner triangles (u + v < 0.3 in box units, which a disc leaves
   empty); reach = the farthest pixel from the centroid over the major
   semi-axis of the ellipse with the same second moments (1 for discs and
   ellipses of any aspect, 1.22 for a square at any rotation). Ideal values:
   square fill 1, corners 1, top 0.5; disc fill pi/4, corners 0, top 0.5;
   triangle (pointing up) fill 0.5, top 0.25, top corners 0. Rules:
   aspect outside [0.67, 1.5] -> other; top share < 0.40 with empty top
   corners (<= 0.34) and fill in [0.40, 0.80] -> triangle (narrow at the
   top); top share in [0.40, 0.60] -> square when it shows square corners
   (squareness = half from fill, half from corners, >= 0.65; or fill >=
   0.925, a box with rounded corners; or reach >= 1.135 with fill >= 0.58,
   a square tilted by up to about 20 degrees), else circle when fill >=
   0.60; anything else (a diamond, a ring, a downward triangle) -> "other",
   which no prompt asks for. Rounded corners, lumpy or elliptical discs, a
   blunt or off-centre apex and small tilts all keep their class (tests).
   The margins are wide from 64 px up (ground-truth renders, blurred or
   noisy, score 100% in our runs at 64-256 px); at 32 px a small disc is a
   7-px block with notched corners, and blurred 32-px renders score about
   96-98%.
6. Size class: the spec's ranges widened by `SIZE_TOLERANCE` = 0.05, which
   splits the gap between small (0.22-0.28) and large (0.38-0.44) in the
   middle: small = [0.17, 0.33], large = [0.33, 0.49].
7. Position and relation: the spec's tables on bounding-box centres, each
   bound widened by `TOLERANCE` = 0.03 of the canvas (positions: ranges
   widened by 0.03; relations: gap >= 0.32, misalignment <= 0.18). The
   margin absorbs the pixel grid (half a pixel at each edge of the box, a
   pixel at a triangle's apex) and small drift in generated images; without
   it up to 1% of blurred ground-truth renders fail at 64 and 128 px. Widened
   positions still keep "in the center" apart from the rest; neighbours such
   as "on the left" and "at the top" share only a 0.01 x 0.01 corner.

An image is correct when it holds exactly the prompted objects (no more, no
fewer), each of the prompted colour and shape, and, where the prompt states
them, the size class, position, relation and background. Categories, which
overlap: "single", "position", "two_objects", "background", and
"held_out" (a held-out colour-shape pair). `score_images` reports held-out
prompts apart: "overall" and the other categories count only prompts
without a held-out pair.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

from latent_diffusion.shapes.captions import CATEGORIES, ObjectSpec, PromptSpec, parse_prompt
from latent_diffusion.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    OBJECT_COLOURS,
    SIZE_CLASSES,
    position_holds,
    relation_holds,
    size_class_of,
)

MIN_AREA_FRACTION = 0.25 * 0.5 * min(SIZE_CLASSES["small"]) ** 2  # a quarter of the smallest triangle
TOLERANCE = 0.03  # fractions of the canvas, for positions and relations
SIZE_TOLERANCE = 0.05  # meets the middle of the small-large gap
RECONSTRUCT_STEPS = 2  # pixels an opened component regrows into its colour mask
CIRCLE_FILL = np.pi / 4
CORNER = 0.3  # corner triangles: u + v < 0.3 in box units (a disc leaves u + v < 0.293 empty)

_PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.int32)  # (9, 3)

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]


class ShapeFeatures(NamedTuple):
    """Numbers of an object's pixels in its bounding box (w wide, h high) that tell the shapes apart."""

    aspect: float  # w / h
    fill: float  # area / (w h)
    top_share: float  # fraction of the area in the top half of the box
    top_corners: float  # filled fraction of the two top corner triangles
    bottom_corners: float  # filled fraction of the two bottom corner triangles
    reach: float  # farthest pixel from the centroid / major semi-axis of the moment-matched ellipse


@dataclasses.dataclass(frozen=True)
class DetectedObject:
    """One detected object: colour, shape ("circle"/"square"/"triangle"/"other"), centre and side in fractions, area in px."""

    colour: str
    shape: str
    cx: float
    cy: float
    d: float
    area: int
    features: Optional[ShapeFeatures] = None

    @property
    def centre(self) -> tuple[float, float]:
        return (self.cx, self.cy)

    def describe(self) -> str:
        return f"{self.colour} {self.shape} at ({self.cx:.2f}, {self.cy:.2f}) d={self.d:.2f}"


@dataclasses.dataclass(frozen=True)
class Detection:
    """What an image holds: the background colour name and the objects, in colour order then top-to-bottom."""

    background: str
    objects: tuple[DetectedObject, ...]

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self):
        return iter(self.objects)


@dataclasses.dataclass(frozen=True)
class Judgement:
    """The verdict on one image: correct or not, the prompt's categories, and why not (empty when correct)."""

    correct: bool
    categories: tuple[str, ...]
    reasons: list[str]
    detection: Optional[Detection] = None


# ---------------------------------------------------------------- pixels


def _to_array(image: ImageLike) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, an image file's path, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image {os.fspath(image)!r}: no such file")
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be a PIL image, a path or an RGB (H, W, 3) array; got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return array


def classify_pixels(array: np.ndarray) -> np.ndarray:
    """(H, W) index into the palette (COLOURS order) of each pixel's nearest palette colour."""
    pixels = array.astype(np.int32)[:, :, None, :]  # (H, W, 1, 3)
    distance = ((pixels - _PALETTE) ** 2).sum(-1)  # (H, W, 9)
    return distance.argmin(-1)


def border_class(classes: np.ndarray) -> int:
    """The commonest palette index on the one-pixel border."""
    border = np.concatenate([classes[0], classes[-1], classes[1:-1, 0], classes[1:-1, -1]])
    return int(np.bincount(border, minlength=len(_PALETTE_NAMES)).argmax())


# ---------------------------------------------------------------- masks


def _square_3x3(mask: np.ndarray, reduce) -> np.ndarray:
    """3x3 square erosion (reduce = np.logical_and) or dilation (np.logical_or), outside the image counting as False."""
    p = np.pad(mask, 1, constant_values=False)
    rows = reduce(reduce(p[:-2], p[1:-1]), p[2:])  # (H, W + 2): across each pixel's row neighbours above and below
    return reduce(reduce(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])  # (H, W)


def erode(mask: np.ndarray) -> np.ndarray:
    return _square_3x3(mask, np.logical_and)


def dilate(mask: np.ndarray) -> np.ndarray:
    return _square_3x3(mask, np.logical_or)


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True, row-major: (rows, starts, stops) with stop exclusive."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, stops = np.nonzero(edges == -1)
    return rows, starts, stops


def _link_runs(rows: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> list[int]:
    """Union-find over runs: runs on neighbouring rows that share a column are one component (4-connectivity)."""
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(int(rows.max(initial=-1)) + 2))
    for r in range(len(row_first) - 2):
        i, i_end = row_first[r], row_first[r + 1]
        k, k_end = row_first[r + 1], row_first[r + 2]
        while i < i_end and k < k_end:
            if starts[i] < stops[k] and starts[k] < stops[i]:
                parent[find(i)] = find(k)
            if stops[i] < stops[k]:
                i += 1
            else:
                k += 1
    return [find(i) for i in range(len(rows))]


def connected_components(mask: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """4-connected components of a bool mask, top to bottom: (mask cropped to its box, box (y0, y1, x0, x1)) each."""
    rows, starts, stops = _runs(mask)
    roots = np.asarray(_link_runs(rows, starts, stops), dtype=np.int64)
    components = []
    for root in np.unique(roots):
        mine = roots == root
        r, s, e = rows[mine], starts[mine], stops[mine]
        y0, y1, x0, x1 = int(r.min()), int(r.max()) + 1, int(s.min()), int(e.max())
        crop = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for row, start, stop in zip(r, s, e):
            crop[row - y0, start - x0 : stop - x0] = True
        components.append((crop, (y0, y1, x0, x1)))
    return sorted(components, key=lambda component: (component[1][0], component[1][2]))  # top to bottom


# ---------------------------------------------------------------- shapes


def _corner_regions(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) bool masks of the top and bottom corner triangles: pixel centres with u + v < CORNER, mirrored."""
    u = (np.arange(w) + 0.5) / w
    v = (np.arange(h) + 0.5) / h
    near_u = np.minimum(u, 1 - u)[None, :]  # (1, w) distance to the nearer side
    top = (near_u + v[:, None]) < CORNER
    bottom = (near_u + (1 - v)[:, None]) < CORNER
    return top, bottom


def corner_reach(crop: np.ndarray) -> float:
    """How far the shape reaches beyond an ellipse with its second moments: 1 for discs and ellipses of any
    aspect, 2 / sqrt(8/3) = 1.22 for a square at any rotation, more for triangles. Pixels count as unit squares."""
    ys, xs = np.nonzero(crop)
    points = np.stack([xs, ys], axis=1).astype(np.float64)  # (N, 2)
    points -= points.mean(axis=0)
    covariance = points.T @ points / len(points) + np.eye(2) / 12  # + a unit pixel's own spread
    semi_major = 2 * np.sqrt(np.linalg.eigvalsh(covariance)[-1])
    return float((np.sqrt((points**2).sum(axis=1)).max() + 0.5) / semi_major)


def shape_features(crop: np.ndarray) -> ShapeFeatures:
    """ShapeFeatures of a bool mask cropped to its bounding box."""
    h, w = crop.shape
    row_mass = crop.sum(axis=1)
    top_weight = np.clip(h / 2 - np.arange(h), 0.0, 1.0)  # the part of each row above the middle
    area = float(row_mass.sum())
    top, bottom = _corner_regions(h, w)
    return ShapeFeatures(
        aspect=w / h,
        fill=area / (h * w),
        top_share=float((row_mass * top_weight).sum() / area),
        top_corners=float(crop[top].mean()) if top.any() else 0.5,
        bottom_corners=float(crop[bottom].mean()) if bottom.any() else 0.5,
        reach=corner_reach(crop),
    )


def squareness(f: ShapeFeatures) -> float:
    """About 1 for an axis-aligned square and 0 for a disc: half from the fill (pi/4 -> 0, 1 -> 1), half from the corners."""
    return 0.5 * (f.fill - CIRCLE_FILL) / (1 - CIRCLE_FILL) + 0.25 * (f.top_corners + f.bottom_corners)


def _is_square(f: ShapeFeatures) -> bool:
    """Square corners, seen axis-aligned (squareness), as a nearly full box (rounded corners) or at a tilt (reach)."""
    return squareness(f) >= 0.65 or f.fill >= 0.925 or (f.reach >= 1.135 and f.fill >= 0.58)


def classify_shape(f: ShapeFeatures) -> str:
    """circle, square, triangle or other, from shape_features (rules in the module docstring)."""
    if not 0.67 <= f.aspect <= 1.5:
        return "other"
    if f.top_share < 0.40 and f.top_corners <= 0.34 and 0.40 <= f.fill <= 0.80:
        return "triangle"  # the mass sits low and the top corners are empty: narrow at the top
    if 0.40 <= f.top_share <= 0.60 and f.fill >= 0.60:
        return "square" if _is_square(f) else "circle"
    if 0.40 <= f.top_share <= 0.60 and _is_square(f):
        return "square"  # tilted by up to about 20 degrees: fill falls to 0.6
    return "other"


def _object_pixels(core: np.ndarray, box, colour_mask: np.ndarray):
    """The component regrown by RECONSTRUCT_STEPS pixels into its colour's mask, cropped to its box: (crop, (y0, x0))."""
    height, width = colour_mask.shape
    y0, y1, x0, x1 = box
    pad = RECONSTRUCT_STEPS
    wy0, wy1, wx0, wx1 = max(0, y0 - pad), min(height, y1 + pad), max(0, x0 - pad), min(width, x1 + pad)
    allowed = colour_mask[wy0:wy1, wx0:wx1]
    grown = np.zeros(allowed.shape, dtype=bool)
    grown[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = core
    for _ in range(pad):
        grown = dilate(grown) & allowed
    ys, xs = np.nonzero(grown)
    crop = grown[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return crop, (wy0 + int(ys.min()), wx0 + int(xs.min()))


def _measure(colour: str, crop: np.ndarray, origin, height: int, width: int) -> DetectedObject:
    features = shape_features(crop)
    h, w = crop.shape
    cx = (origin[1] + w / 2) / width
    cy = (origin[0] + h / 2) / height
    d = max(w / width, h / height)
    return DetectedObject(colour, classify_shape(features), cx, cy, d, int(crop.sum()), features)


def _objects_of_colour(colour: str, colour_mask: np.ndarray, min_area: float) -> list[DetectedObject]:
    core = dilate(erode(colour_mask))  # opening: drops specks and thin fringes
    if core.sum() < min_area:
        return []
    height, width = colour_mask.shape
    found = []
    for component, box in connected_components(core):
        if component.sum() >= min_area:
            crop, origin = _object_pixels(component, box, colour_mask)
            found.append(_measure(colour, crop, origin, height, width))
    return found


def detect_objects(image: ImageLike, min_area_fraction: float = MIN_AREA_FRACTION) -> Detection:
    """The background colour and every object (one per large enough connected component of an object colour)."""
    array = _to_array(image)
    classes = classify_pixels(array)
    background = border_class(classes)
    min_area = max(min_area_fraction * classes.size, 4.0)
    objects = []
    for colour in OBJECT_COLOURS:
        index = _PALETTE_NAMES.index(colour)
        if index == background:
            continue
        mask = classes == index
        if mask.any():
            objects += _objects_of_colour(colour, mask, min_area)
    return Detection(_PALETTE_NAMES[background], tuple(objects))


# ---------------------------------------------------------------- judging


def _as_spec(prompt) -> PromptSpec:
    return prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)


def _object_reasons(want: ObjectSpec, got: DetectedObject) -> list[str]:
    reasons = []
    if (want.colour, want.shape) != (got.colour, got.shape):
        reasons.append(f"expected {want.colour} {want.shape}, found {got.describe()}")
    if want.size is not None and size_class_of(got.d, SIZE_TOLERANCE) != want.size:
        reasons.append(f"expected {want.size} {want.shape}, found side d={got.d:.2f} ({got.describe()})")
    return reasons


def _assignment_reasons(spec: PromptSpec, objects: Sequence[DetectedObject], tolerance: float) -> list[str]:
    """What is wrong when the detected objects, in this order, stand for the prompted ones."""
    reasons = [r for want, got in zip(spec.objects, objects) for r in _object_reasons(want, got)]
    if spec.position is not None and not position_holds(objects[0].cx, objects[0].cy, spec.position, tolerance):
        reasons.append(f"{objects[0].describe()} is not {spec.position}")
    if spec.relation is not None and not relation_holds(objects[0].centre, objects[1].centre, spec.relation, tolerance):
        reasons.append(f"{objects[0].describe()} is not {spec.relation} {objects[1].describe()}")
    return reasons


def _objects_reasons(spec: PromptSpec, detection: Detection, tolerance: float) -> list[str]:
    """Empty when some matching of detected to prompted objects satisfies the prompt; else the nearest miss's reasons."""
    if len(detection.objects) != len(spec.objects):
        found = "; ".join(o.describe() for o in detection.objects) or "nothing"
        return [f"expected {len(spec.objects)} object(s), found {len(detection.objects)}: {found}"]
    best = None
    for order in itertools.permutations(detection.objects):
        reasons = _assignment_reasons(spec, order, tolerance)
        if not reasons:
            return []
        if best is None or len(reasons) < len(best):
            best = reasons
    return best


def _background_reasons(spec: PromptSpec, detection: Detection) -> list[str]:
    if detection.background not in BACKGROUNDS:
        return [f"background is {detection.background}, not one of {BACKGROUNDS}"]
    if spec.background is not None and detection.background != spec.background:
        return [f"expected {spec.background} background, found {detection.background}"]
    return []


def judge_detection(detection: Detection, prompt: Union[str, PromptSpec], tolerance: float = TOLERANCE) -> Judgement:
    """Judge an existing detection against a prompt (several prompts against one image need one detection)."""
    spec = _as_spec(prompt)
    reasons = _background_reasons(spec, detection) + _objects_reasons(spec, detection, tolerance)
    return Judgement(not reasons, spec.categories, reasons, detection)


def judge(image: ImageLike, prompt: Union[str, PromptSpec], tolerance: float = TOLERANCE) -> Judgement:
    """Is `image` exactly what `prompt` asks for? ValueError for a prompt outside the Shapes grammar."""
    spec = _as_spec(prompt)  # parse first: a bad prompt fails before any work on the image
    return judge_detection(detect_objects(image), spec, tolerance)


# ---------------------------------------------------------------- reports

REPORT_KEYS: tuple[str, ...] = ("overall",) + CATEGORIES


def _prompt_text(prompt) -> Union[str, PromptSpec]:
    """Accept a prompt, a PromptSpec, or a (prompt, categories) pair as evaluation_prompts() gives them."""
    return prompt[0] if isinstance(prompt, tuple) else prompt


def _report_buckets(categories: tuple[str, ...]) -> tuple[str, ...]:
    """Held-out prompts count only under "held_out"; the others under "overall" and each of their categories."""
    if "held_out" in categories:
        return ("held_out",)
    return ("overall",) + categories


def score_images(
    images: Iterable[ImageLike], prompts: Sequence, tolerance: float = TOLERANCE
) -> dict:
    """Judge each image against its prompt and report accuracy per category.

    Returns {"overall", "single", "position", "two_objects", "background", "held_out": accuracy or None when
    no prompt falls there; "counts" and "correct": per-key totals; "failures": [{"index", "prompt", "reasons"}]}.
    "overall" and the four structural categories count only prompts without a held-out pair.
    """
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must pair up; got {len(images)} images and {len(prompts)} prompts")
    counts = dict.fromkeys(REPORT_KEYS, 0)
    correct = dict.fromkeys(REPORT_KEYS, 0)
    failures = []
    for index, (image, prompt) in enumerate(zip(images, prompts)):
        verdict = judge(image, _prompt_text(prompt), tolerance)
        for key in _report_buckets(verdict.categories):
            counts[key] += 1
            correct[key] += int(verdict.correct)
        if not verdict.correct:
            failures.append({"index": index, "prompt": str(_prompt_text(prompt)), "reasons": verdict.reasons})
    report = {key: (correct[key] / counts[key] if counts[key] else None) for key in REPORT_KEYS}
    report.update(counts=counts, correct=correct, failures=failures)
    return report


def format_report(report: dict) -> str:
    """A small text table of a score_images report."""
    lines = [f"{'category':<12} {'accuracy':>8} {'correct':>8} {'count':>6}"]
    for key in REPORT_KEYS:
        accuracy = report[key]
        shown = "-" if accuracy is None else f"{accuracy:.3f}"
        lines.append(f"{key:<12} {shown:>8} {report['correct'][key]:>8} {report['counts'][key]:>6}")
    return "\n".join(lines)
