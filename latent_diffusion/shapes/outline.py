"""Outline control images of Shapes scenes (for ControlNets) and the outline-adherence judge.

Spec (shared/specs/shapes.md, "Control images"): a black canvas of the scene's side S with every object's
boundary in white, the boundary being the pixels of its filled mask with at least one of their four
neighbours outside the mask or the canvas, dilated round(S/64) − 1 times with a 3×3 square above S = 64.
A generation matches the outline when each outlined object is matched by exactly one generated object of the
outline's shape whose centre is within 0.06·S of the outline's, in the prompt's colour, and nothing else is
drawn. The prompt's colours are the scene's (the caption names them), so the judge takes the scene.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from latent_diffusion.shapes.scorer import DetectedObject, ImageLike, detect_objects, dilate
from latent_diffusion.shapes.world import Scene, SceneObject, _pixel_centres, check_size, shape_mask

OUTLINE_TOLERANCE = 0.06  # of the canvas side, between an outline's centre and the generated object's


def object_boundary(obj: SceneObject, size: int) -> np.ndarray:
    """(S, S) bool: the pixels of the object's filled mask with a 4-neighbour outside it or outside the canvas."""
    centres = _pixel_centres(size)
    mask = shape_mask(obj.shape, obj.cx, obj.cy, obj.d, centres, centres)  # (S, S)
    padded = np.pad(mask, 1, constant_values=False)  # outside the canvas counts as outside the shape
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]  # all four neighbours in
    return mask & ~inner


def outline_array(scene: Scene, size: int = 64) -> np.ndarray:
    """(S, S, 3) uint8: white object boundaries on black, thickened above S = 64."""
    size = check_size(size)
    lines = np.zeros((size, size), bool)
    for obj in scene.objects:
        lines |= object_boundary(obj, size)
    for _ in range(max(0, round(size / 64) - 1) if size > 64 else 0):
        lines = dilate(lines)
    return np.repeat(lines[..., None], 3, axis=-1).astype(np.uint8) * 255


def outline_image(scene: Scene, size: int = 64) -> Image.Image:
    """The scene's outline control image as an RGB PIL image of side `size`."""
    return Image.fromarray(outline_array(scene, size))


@dataclasses.dataclass(frozen=True)
class OutlineJudgement:
    """Whether a generation follows its outline and prompt, and why not."""

    correct: bool
    reasons: list[str]
    objects: tuple[DetectedObject, ...]
    matched: int = 0  # outlined objects matched by exactly one generated object of their shape, place and colour


def judge_outline(image: ImageLike, scene: Scene, tolerance: float = OUTLINE_TOLERANCE) -> OutlineJudgement:
    """Each of the scene's objects matched by exactly one generated object of its shape within `tolerance` of its
    centre and in its colour; no other object drawn."""
    objects = detect_objects(image).objects
    reasons, used, matched = [], set(), 0
    for want in scene.objects:
        near = [i for i, got in enumerate(objects) if got.shape == want.shape
                and max(abs(got.cx - want.cx), abs(got.cy - want.cy)) <= tolerance]
        if len(near) != 1:
            reasons.append(f"{len(near)} {want.shape}s within {tolerance} of ({want.cx:.2f}, {want.cy:.2f}), want 1")
            continue
        used.add(near[0])
        if objects[near[0]].colour != want.colour:
            reasons.append(f"the {want.shape} at ({want.cx:.2f}, {want.cy:.2f}) is {objects[near[0]].colour}, "
                           f"want {want.colour}")
        else:
            matched += 1
    reasons += [f"extra object: {got.describe()}" for i, got in enumerate(objects) if i not in used]
    return OutlineJudgement(not reasons, reasons, objects, matched)
