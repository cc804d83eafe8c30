"""The outline ControlNet's adherence measure (evaluation/control_adherence.py) and the shipped 'default-outline'."""
import numpy as np
import pytest
from PIL import Image

from latent_diffusion.evaluation.control_adherence import is_unnameable, judge_images, unnameable_scenes
from latent_diffusion.formats.assets import DEFAULT_CONTROLNETS
from latent_diffusion.shapes.captions import full_caption, parse_prompt
from latent_diffusion.shapes.world import POSITIONS, Scene, SceneObject, position_holds, render

SHIPPED = (DEFAULT_CONTROLNETS["default-outline"] / "config.json").is_file()


@pytest.mark.parametrize("objects", [1, 2])
def test_held_out_scenes_stand_where_no_caption_names_them(objects):
    scenes = unnameable_scenes(40, objects=objects)
    assert len(scenes) == 40 and all(len(s.objects) == objects for s in scenes)
    for scene in scenes:
        assert not any(position_holds(o.cx, o.cy, p) for o in scene.objects for p in POSITIONS)
        assert parse_prompt(full_caption(scene)).position is None  # the prompt never names a place
    assert unnameable_scenes(5, objects=objects) == scenes[:5]  # each scene from its own generator


def test_a_named_place_is_not_held_out():
    at_left = Scene((SceneObject("red", "circle", 0.25, 0.5, 0.3),), "white")
    assert not is_unnameable(at_left)
    assert is_unnameable(Scene((SceneObject("red", "circle", 0.37, 0.62, 0.3),), "white"))


def test_judge_counts_matched_objects():
    """The scene's own rendering matches every object; the wrong colour, a moved object or a blank do not."""
    scenes = unnameable_scenes(6, objects=2)
    perfect = judge_images([render(s, 64) for s in scenes], scenes)
    assert perfect.objects_matched == 1.0 and perfect.images_correct == 1.0 and perfect.num_objects == 12
    blank = judge_images([Image.new("RGB", (64, 64), (128, 128, 128))] * 6, scenes)
    assert blank.objects_matched == 0.0 and blank.images_correct == 0.0
    scene = scenes[0]
    first, second = scene.objects
    recoloured = Scene((SceneObject("blue" if first.colour != "blue" else "red", first.shape, first.cx, first.cy,
                                    first.d), second), scene.background, relation=scene.relation)
    half = judge_images([render(recoloured, 64)], [scene])
    assert half.objects_matched == 0.5 and half.images_correct == 0.0


@pytest.mark.skipif(not SHIPPED, reason="no shipped outline ControlNet in this checkout")
def test_default_outline_resolves_in_pipeline_and_cli(tmp_path):
    """`controlnet="default-outline"` loads the shipped ControlNet into the embedded model; the CLI's
    `--controlnet default-outline --control-image` generates with it, and the outline changes the image."""
    from diffusers import ControlNetModel

    from latent_diffusion.apps.cli import main
    from latent_diffusion.pipelines import LatentDiffusionPipeline
    from latent_diffusion.shapes.outline import outline_image

    pipe = LatentDiffusionPipeline.from_pretrained(controlnet="default-outline")
    assert isinstance(pipe.controlnet, ControlNetModel)
    outline = tmp_path / "outline.png"
    outline_image(Scene((SceneObject("red", "circle", 0.37, 0.62, 0.3),), "gray"), 64).save(outline)
    for name, extra in (("plain.png", []), ("with.png", ["--controlnet", "default-outline", "--control-image",
                                                          str(outline)])):
        assert main(["generate", "a red circle", "--seed", "0", "--quiet", "-o", str(tmp_path / name), *extra]) in (0, None)
    plain, controlled = (np.asarray(Image.open(tmp_path / n), dtype=float) for n in ("plain.png", "with.png"))
    assert np.abs(plain - controlled).max() > 10
