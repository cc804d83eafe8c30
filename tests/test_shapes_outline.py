"""Outline control images of Shapes scenes (spec: shared/specs/shapes.md, "Control images") and their judge."""
import dataclasses

import numpy as np

from latent_diffusion.shapes.outline import judge_outline, object_boundary, outline_array
from latent_diffusion.shapes.world import COLOURS, Scene, SceneObject, render, render_array, sample_scene


def two_objects():
    return Scene(objects=(SceneObject("red", "circle", 0.3, 0.35, 0.3), SceneObject("blue", "square", 0.7, 0.7, 0.25)),
                 background="gray", relation="above")


def test_outline_is_the_boundary_of_the_rendered_objects():
    scene = two_objects()
    lines = outline_array(scene, 64)[..., 0] > 0
    filled = (render_array(scene, 64) != COLOURS["gray"]).any(-1)
    assert set(np.unique(outline_array(scene, 64))) == {0, 255}
    assert lines.any() and not (lines & ~filled).any()  # only object pixels
    inside = filled & ~lines
    assert inside.sum() > lines.sum()  # the interiors stay black
    padded = np.pad(filled, 1)
    neighbours_out = ~(padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    assert np.array_equal(lines, filled & neighbours_out)  # exactly the 4-neighbour boundary


def test_boundary_at_the_canvas_edge_and_thickening_above_64():
    edge = SceneObject("green", "square", 0.1, 0.5, 0.3)  # reaches past the left edge
    assert object_boundary(edge, 64)[:, 0].any()  # outside the canvas counts as outside the shape
    scene = two_objects()
    thin = outline_array(scene, 128)
    assert np.array_equal(thin, outline_array(scene, 128))
    at_64 = outline_array(scene, 64)[..., 0] > 0
    at_128 = thin[..., 0] > 0
    assert at_128.sum() > 2 * at_64.sum() * 1.5  # twice the perimeter in pixels, and one pixel thicker


def test_judge_accepts_the_scene_and_names_what_is_wrong():
    scene = two_objects()
    assert judge_outline(render(scene, 64), scene).correct
    moved = Scene(objects=(dataclasses.replace(scene.objects[0], cx=0.45), scene.objects[1]), background="gray", relation="above")
    judgement = judge_outline(render(moved, 64), scene)
    assert not judgement.correct and "0 circles within 0.06" in judgement.reasons[0]
    recoloured = Scene(objects=(dataclasses.replace(scene.objects[0], colour="green"), scene.objects[1]),
                       background="gray", relation="above")
    assert "is green, want red" in judge_outline(render(recoloured, 64), scene).reasons[0]
    extra = Scene(objects=(*scene.objects[:1],), background="gray")
    assert "extra object" in judge_outline(render(scene, 64), extra).reasons[-1]


def test_sampled_scenes_judge_their_own_renders():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(40)]
    assert sum(judge_outline(render(s, 64), s).correct for s in scenes) >= 38


def test_dataset_option_emits_the_outline_column():
    from latent_diffusion.shapes.dataset import shapes_dataset, shapes_example
    from latent_diffusion.shapes.outline import outline_image

    plain, with_outline = shapes_dataset(3, seed=5), shapes_dataset(3, seed=5, outline=True)
    assert plain.column_names == ["image", "text"]
    assert with_outline.column_names == ["image", "text", "conditioning_image"]
    assert with_outline["text"] == plain["text"]  # the same examples, one column more
    for index in range(3):
        rng = np.random.default_rng((5, index))
        expected = outline_image(sample_scene(rng, "train"), 64)
        row = with_outline[index]
        assert np.array_equal(np.asarray(row["conditioning_image"].convert("RGB")), np.asarray(expected))
        assert np.array_equal(np.asarray(row["image"]), np.asarray(shapes_example(index, seed=5)["image"]))
    assert shapes_dataset(0, outline=True).column_names == ["image", "text", "conditioning_image"]
