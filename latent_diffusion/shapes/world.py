"""The Shapes world: palette, shapes, layout rules, scene sampling and rendering.

This module is the executable form of `docs/shapes.md`. Everything that the
spec states as a table lives here once, as data, and is used by the sampler,
the captions and the scorer alike:

* `COLOURS` (exact sRGB), `OBJECT_COLOURS`, `BACKGROUNDS`, `SHAPES`;
* `SIZE_CLASSES` (single objects) and `TWO_OBJECT_SIDE` (two-object scenes);
* `POSITIONS` and `RELATIONS`, keyed by the caption phrase itself
  ("on the left", "to the left of"), with `position_holds` and
  `relation_holds` checking the rules on bounding-box centres;
* `HELD_OUT_PAIRS`, the colour-shape pairs that never occur in training.

Geometry is stored in fractions of the canvas side S (x to the right, y
downwards, both in [0, 1]), so one `Scene` renders at any allowed S.

Choices where the spec is silent (written down here, as it asks):

* Scene kinds: half the scenes hold one object, half two. A single object
  always has a size class (small or large, equally likely; d uniform in the
  class's range) and, with probability 0.6, a position drawn uniformly from
  the five positions; otherwise its centre is uniform over every place that
  keeps it inside the canvas. Backgrounds are uniform over the table.
* Two-object scenes: each side d uniform in [0.22, 0.32], the relation
  uniform over the four; the gap between centres along the relation's axis
  is uniform in [0.35, largest that fits] and the offset across it uniform
  within +-0.15, clipped so both shapes stay inside. A gap of at least 0.35
  with sides of at most 0.32 keeps the two bounding boxes apart, so the
  shapes never overlap (at S = 32 same-coloured shapes may touch, 1 px apart).
  A and B always differ in colour, shape or both.
* Splits: "train" never draws a held-out pair; "heldout" scenes hold at least
  one held-out pair; "all" draws from every pair. The colour-shape pairs of
  a scene are drawn uniformly from the allowed pairs and redrawn until the
  split's condition holds.
* Rendering has no anti-aliasing: a pixel takes the shape's exact palette
  colour when its centre ((j + 0.5) / S, (i + 0.5) / S) lies inside the
  shape (borders included). It is plain numpy on each shape's bounding box:
  about 70 microseconds per 64 px image (some 14,000 images/s on one core).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np
from PIL import Image

# ---------------------------------------------------------------- the tables

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 20),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "purple": (150, 40, 200),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
OBJECT_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("orange", "circle"), ("green", "square"))

SIZE_CLASSES: dict[str, tuple[float, float]] = {"small": (0.22, 0.28), "large": (0.38, 0.44)}
TWO_OBJECT_SIDE: tuple[float, float] = (0.22, 0.32)

# phrase -> ((cx_min, cx_max), (cy_min, cy_max)) for the bounding-box centre
POSITIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "on the left": ((0.20, 0.30), (0.35, 0.65)),
    "on the right": ((0.70, 0.80), (0.35, 0.65)),
    "at the top": ((0.35, 0.65), (0.20, 0.30)),
    "at the bottom": ((0.35, 0.65), (0.70, 0.80)),
    "in the center": ((0.45, 0.55), (0.45, 0.55)),
}

# phrase -> (axis, sign): "A rel B" holds when sign * (B - A) >= RELATION_GAP along
# `axis` (0 = x, 1 = y) and |A - B| <= RELATION_ALIGN along the other axis.
RELATIONS: dict[str, tuple[int, int]] = {
    "above": (1, +1),
    "below": (1, -1),
    "to the left of": (0, +1),
    "to the right of": (0, -1),
}
RELATION_GAP = 0.35
RELATION_ALIGN = 0.15

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in OBJECT_COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

SINGLE_PROBABILITY = 0.5  # P(one object) against P(two objects with a relation)
POSITION_PROBABILITY = 0.6  # P(a single object has a position phrase)

MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 32, 512, 8


def check_size(size) -> int:
    """Return `size` if it is an allowed canvas side (a multiple of 8 in [32, 512]), else raise ValueError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be an int, a multiple of {SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}]; got {size!r}")
    if not (MIN_SIZE <= size <= MAX_SIZE and size % SIZE_MULTIPLE == 0):
        raise ValueError(f"size must be a multiple of {SIZE_MULTIPLE} in [{MIN_SIZE}, {MAX_SIZE}]; got {size}")
    return int(size)


def check_split(split: str) -> str:
    """Return `split` if it is one of SPLITS, else raise ValueError."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    return split


def is_held_out(colour: str, shape: str) -> bool:
    """True for the colour-shape pairs that never occur in training data."""
    return (colour, shape) in HELD_OUT_PAIRS


# ---------------------------------------------------------------- the rules


def _within(value: float, bounds: tuple[float, float], tolerance: float) -> bool:
    return bounds[0] - tolerance <= value <= bounds[1] + tolerance


def position_holds(cx: float, cy: float, position: str, tolerance: float = 0.0) -> bool:
    """The position table's rule on a bounding-box centre, each range widened by `tolerance` (fractions of S)."""
    x_range, y_range = POSITIONS[position]
    return _within(cx, x_range, tolerance) and _within(cy, y_range, tolerance)


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, tolerance: float = 0.0) -> bool:
    """The relation table's rule for "A <relation> B" on centres a = (cxA, cyA), b = (cxB, cyB).

    `tolerance` lowers the required gap and raises the allowed misalignment by that much (fractions of S).
    """
    axis, sign = RELATIONS[relation]
    gap = sign * (b[axis] - a[axis])
    misalignment = abs(a[1 - axis] - b[1 - axis])
    return gap >= RELATION_GAP - tolerance and misalignment <= RELATION_ALIGN + tolerance


def size_class_of(d: float, tolerance: float = 0.0) -> Optional[str]:
    """The size class whose range, widened by `tolerance`, holds side d (fractions of S); None if none does."""
    for name, bounds in SIZE_CLASSES.items():
        if _within(d, bounds, tolerance):
            return name
    return None


# ---------------------------------------------------------------- scenes


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One filled shape: colour and shape names, centre (cx, cy) and side d in fractions of S, size class or None."""

    colour: str
    shape: str
    cx: float
    cy: float
    d: float
    size: Optional[str] = None

    def __post_init__(self):
        if self.colour not in OBJECT_COLOURS:
            raise ValueError(f"colour must be one of {OBJECT_COLOURS}; got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}; got {self.shape!r}")
        if self.size is not None and self.size not in SIZE_CLASSES:
            raise ValueError(f"size must be None or one of {tuple(SIZE_CLASSES)}; got {self.size!r}")

    @property
    def centre(self) -> tuple[float, float]:
        return (self.cx, self.cy)

    @property
    def held_out(self) -> bool:
        return is_held_out(self.colour, self.shape)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A Shapes image in words and numbers: one or two objects, a background, a position or a relation.

    Single-object scenes may carry a `position` phrase; two-object scenes carry
    a `relation` phrase that reads "objects[0] <relation> objects[1]".
    """

    objects: tuple[SceneObject, ...]
    background: str
    position: Optional[str] = None
    relation: Optional[str] = None

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}; got {self.background!r}")
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene holds one or two objects; got {len(self.objects)}")
        if self.position is not None and (self.position not in POSITIONS or len(self.objects) != 1):
            raise ValueError(f"position must be None or, for one object, one of {tuple(POSITIONS)}; got {self.position!r}")
        if (self.relation is None) != (len(self.objects) == 1) or (self.relation and self.relation not in RELATIONS):
            raise ValueError(f"relation must be one of {tuple(RELATIONS)} for two objects, None for one; got {self.relation!r}")

    @property
    def held_out(self) -> bool:
        """True when any object is a held-out colour-shape pair (such scenes never enter the training split)."""
        return any(o.held_out for o in self.objects)


# ---------------------------------------------------------------- sampling


def _pairs_for(rng: np.random.Generator, count: int, split: str) -> list[tuple[str, str]]:
    """`count` colour-shape pairs obeying the split (and, for two, differing), drawn uniformly then redrawn until they do."""
    pool = TRAIN_PAIRS if split == "train" else ALL_PAIRS
    while True:
        pairs = [pool[i] for i in rng.integers(len(pool), size=count)]
        if count == 2 and pairs[0] == pairs[1]:
            continue
        if split != "heldout" or any(p in HELD_OUT_PAIRS for p in pairs):
            return pairs


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high)) if high > low else float(low)


def _single_scene(rng: np.random.Generator, split: str, background: str) -> Scene:
    (colour, shape), = _pairs_for(rng, 1, split)
    size = ("small", "large")[int(rng.integers(2))]
    d = _uniform(rng, *SIZE_CLASSES[size])
    position = None
    x_range = y_range = (d / 2, 1 - d / 2)  # anywhere that keeps the shape inside
    if rng.random() < POSITION_PROBABILITY:
        position = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        (x_lo, x_hi), (y_lo, y_hi) = POSITIONS[position]
        x_range = (max(x_lo, d / 2), min(x_hi, 1 - d / 2))
        y_range = (max(y_lo, d / 2), min(y_hi, 1 - d / 2))
    obj = SceneObject(colour, shape, _uniform(rng, *x_range), _uniform(rng, *y_range), d, size)
    return Scene((obj,), background, position=position)


def _relation_centres(rng: np.random.Generator, relation: str, d_a: float, d_b: float) -> tuple[list, list]:
    """Centres of A and B obeying the relation's rule with both shapes inside the canvas."""
    axis, sign = RELATIONS[relation]
    gap = _uniform(rng, RELATION_GAP, 1 - d_a / 2 - d_b / 2)
    # along the axis: the earlier shape (smaller coordinate) first, then the later one `gap` after it
    d_first, d_second = (d_a, d_b) if sign > 0 else (d_b, d_a)
    first = _uniform(rng, d_first / 2, 1 - d_second / 2 - gap)
    along_a, along_b = (first, first + gap) if sign > 0 else (first + gap, first)
    across_a = _uniform(rng, d_a / 2, 1 - d_a / 2)
    low = max(d_b / 2, across_a - RELATION_ALIGN)
    high = min(1 - d_b / 2, across_a + RELATION_ALIGN)
    across_b = _uniform(rng, low, high)
    a, b = [0.0, 0.0], [0.0, 0.0]
    a[axis], a[1 - axis] = along_a, across_a
    b[axis], b[1 - axis] = along_b, across_b
    return a, b


def _two_object_scene(rng: np.random.Generator, split: str, background: str) -> Scene:
    pair_a, pair_b = _pairs_for(rng, 2, split)
    d_a, d_b = (_uniform(rng, *TWO_OBJECT_SIDE) for _ in range(2))
    relation = tuple(RELATIONS)[int(rng.integers(len(RELATIONS)))]
    a, b = _relation_centres(rng, relation, d_a, d_b)
    objects = (SceneObject(*pair_a, a[0], a[1], d_a), SceneObject(*pair_b, b[0], b[1], d_b))
    return Scene(objects, background, relation=relation)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """Draw one scene from `rng` (a numpy Generator): one object or two with a relation, on a random background.

    split: "train" (no held-out pair anywhere), "heldout" (at least one held-out pair) or "all".
    """
    check_split(split)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng).__name__}")
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if rng.random() < SINGLE_PROBABILITY:
        return _single_scene(rng, split, background)
    return _two_object_scene(rng, split, background)


# ---------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=None)
def _pixel_centres(size: int) -> np.ndarray:
    """(S,) pixel-centre coordinates in fractions of S: (i + 0.5) / S."""
    return (np.arange(size) + 0.5) / size


def shape_mask(shape: str, cx: float, cy: float, d: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs)) bool: which pixel centres (xs across, ys down) lie inside the shape, borders included."""
    dx = xs[None, :] - cx  # (1, W)
    dy = ys[:, None] - cy  # (H, 1)
    half = d / 2
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "triangle":  # apex at the top centre, base d at the bottom, height d
        depth = dy + half  # distance below the apex
        return (depth >= 0) & (dy <= half) & (np.abs(dx) <= depth / 2)
    raise ValueError(f"shape must be one of {SHAPES}; got {shape!r}")


def _paint(canvas: np.ndarray, obj: SceneObject) -> None:
    """Paint one object onto the (S, S, 3) canvas, computing the mask on its bounding box only."""
    size = canvas.shape[0]
    centres = _pixel_centres(size)
    x0, x1 = _pixel_span(obj.cx, obj.d, size)
    y0, y1 = _pixel_span(obj.cy, obj.d, size)
    mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.d, centres[x0:x1], centres[y0:y1])
    canvas[y0:y1, x0:x1][mask] = COLOURS[obj.colour]


def _pixel_span(centre: float, d: float, size: int) -> tuple[int, int]:
    """Pixel index range [start, stop) whose centres may fall in [centre - d/2, centre + d/2]."""
    start = max(0, int(np.floor((centre - d / 2) * size)) - 1)
    stop = min(size, int(np.ceil((centre + d / 2) * size)) + 1)
    return start, stop


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """(S, S, 3) uint8 sRGB image of the scene: background filled, then each object in exact palette colour."""
    size = check_size(size)
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = COLOURS[scene.background]
    for obj in scene.objects:
        _paint(canvas, obj)
    return canvas


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB PIL image of side `size` (a multiple of 8 in [32, 512]), without anti-aliasing."""
    return Image.fromarray(render_array(scene, size))
