"""The strict Shapes scorer: detection, judging of true and mismatched pairs, reports, evaluation prompts."""
import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from latent_diffusion.shapes import (
    BACKGROUNDS,
    COLOURS,
    OBJECT_COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
    caption,
    detect_objects,
    evaluation_prompts,
    format_prompt,
    format_report,
    full_caption,
    judge,
    judge_detection,
    parse_prompt,
    render,
    sample_scene,
    score_images,
    spec_from_scene,
)
from latent_diffusion.shapes.scorer import connected_components


def blur(image):
    return image.filter(ImageFilter.GaussianBlur(radius=0.6))


def noise(image, rng, sigma=8.0):
    array = np.asarray(image).astype(np.float64) + rng.normal(0.0, sigma, size=np.asarray(image).shape)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))


def scenes(n, seed, split="all"):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


# ---------------------------------------------------------------- detection


def test_connected_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.7):
        mask = rng.random((37, 53)) < density
        labels, count = ndimage.label(mask)  # 4-connectivity by default
        ours = connected_components(mask)
        assert len(ours) == count
        for crop, (y0, y1, x0, x1) in ours:
            ys, xs = np.nonzero(crop)
            label = labels[ys[0] + y0, xs[0] + x0]
            assert np.array_equal(labels[y0:y1, x0:x1] == label, crop) and (labels == label).sum() == crop.sum()


def test_detection_recovers_rendered_scenes():
    size = 128
    for scene in scenes(100, seed=1):
        detection = detect_objects(render(scene, size))
        assert detection.background == scene.background and len(detection) == len(scene.objects)
        for want in scene.objects:
            got = min(detection, key=lambda o: (o.cx - want.cx) ** 2 + (o.cy - want.cy) ** 2)
            assert (got.colour, got.shape) == (want.colour, want.shape)
            assert abs(got.cx - want.cx) <= 1 / size and abs(got.cy - want.cy) <= 1 / size
            assert abs(got.d - want.d) <= 2 / size and got.area > 0  # a triangle may lose its 1-px apex row


# ---------------------------------------------------------------- ground truth is judged correct


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("damage", ["clean", "blur", "noise"])
def test_ground_truth_renders_are_judged_correct(size, damage):
    rng = np.random.default_rng(size)
    sample = scenes(300, seed=size + len(damage))
    correct = 0
    for scene in sample:
        image = render(scene, size)
        image = blur(image) if damage == "blur" else noise(image, rng) if damage == "noise" else image
        correct += judge(image, full_caption(scene)).correct
    assert correct / len(sample) >= 0.99


def test_dropped_captions_of_ground_truth_are_judged_correct():
    rng = np.random.default_rng(3)
    sample = scenes(200, seed=3)
    assert sum(judge(render(s, 64), caption(s, rng)).correct for s in sample) / len(sample) >= 0.99


# ---------------------------------------------------------------- mismatches are judged wrong


def _other(rng, options, current):
    return str(rng.choice([o for o in options if o != current]))


def _replace_object(spec, index, **change):
    objects = list(spec.objects)
    objects[index] = dataclasses.replace(objects[index], **change)
    return dataclasses.replace(spec, objects=tuple(objects))


def mismatched_prompts(scene, rng):
    """(kind, prompt) pairs that the scene's image does not satisfy."""
    spec = spec_from_scene(scene)
    k = int(rng.integers(len(spec.objects)))
    out = [
        ("colour", _replace_object(spec, k, colour=_other(rng, OBJECT_COLOURS, spec.objects[k].colour))),
        ("shape", _replace_object(spec, k, shape=_other(rng, SHAPES, spec.objects[k].shape))),
        ("background", dataclasses.replace(spec, background=_other(rng, BACKGROUNDS, spec.background))),
    ]
    if spec.relation is None:
        other = ObjectSpec(_other(rng, OBJECT_COLOURS, spec.objects[0].colour), str(rng.choice(SHAPES)))
        plain = ObjectSpec(spec.objects[0].colour, spec.objects[0].shape)
        out.append(("extra", PromptSpec((plain, other), relation=str(rng.choice(list(RELATIONS))))))
        out.append(("size", _replace_object(spec, 0, size={"small": "large", "large": "small"}[spec.objects[0].size])))
        if spec.position is not None:
            out.append(("position", dataclasses.replace(spec, position=_other(rng, list(POSITIONS), spec.position))))
    else:
        out.append(("relation", dataclasses.replace(spec, relation=_other(rng, list(RELATIONS), spec.relation))))
        out.append(("swapped", dataclasses.replace(spec, objects=spec.objects[::-1])))
        out.append(("missing", PromptSpec((spec.objects[k],), background=spec.background)))
    return out


def test_mismatched_prompts_are_judged_wrong():
    rng = np.random.default_rng(4)
    wrong, total, kinds = 0, 0, set()
    for i, scene in enumerate(scenes(250, seed=4)):
        image = render(scene, 64)
        image = noise(blur(image), rng) if i % 2 else image
        detection = detect_objects(image)
        for kind, prompt in mismatched_prompts(scene, rng):
            kinds.add(kind)
            verdict = judge_detection(detection, format_prompt(prompt))
            wrong += not verdict.correct
            total += 1
            assert verdict.correct == (not verdict.reasons)
    assert kinds == {"colour", "shape", "background", "extra", "size", "position", "relation", "swapped", "missing"}
    assert wrong / total >= 0.99


def test_specks_are_ignored_but_blobs_are_extra_objects():
    scene = Scene((SceneObject("red", "circle", 0.5, 0.5, 0.3, "large"),), "white")
    prompt = "a red circle on a white background"
    array = np.asarray(render(scene, 64)).copy()
    array[2:4, 2:4] = COLOURS["blue"]  # 4 px
    assert judge(array, prompt).correct
    array[50:58, 2:10] = COLOURS["blue"]  # 64 px, above the minimum area at 64 px
    verdict = judge(array, prompt)
    assert not verdict.correct and "found 2" in verdict.reasons[0]


def test_backgrounds_outside_the_table_are_wrong():
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    array[:] = COLOURS["red"]
    array[20:40, 20:40] = COLOURS["blue"]
    verdict = judge(array, "a blue square")
    assert not verdict.correct and "background" in verdict.reasons[0]
    assert judge(array.astype(np.float32) / 255, "a blue square").correct is False  # float images in [0, 1] work


def test_bad_prompts_raise():
    with pytest.raises(ValueError):
        judge(np.zeros((64, 64, 3), np.uint8), "a cat on a sofa")


# ---------------------------------------------------------------- imperfect shapes, as a model might draw them


def _draw(shape, size, colour="blue", background="white"):
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    s, c, d = size, 0.5 * size, 0.4 * size
    if shape == "rounded square":
        draw.rounded_rectangle([c - d / 2, c - d / 2, c + d / 2, c + d / 2], radius=0.15 * d, fill=COLOURS[colour])
    elif shape == "ellipse":
        draw.ellipse([c - 0.55 * d, c - d / 2, c + 0.55 * d, c + d / 2], fill=COLOURS[colour])
    elif shape == "lumpy circle":
        angles = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        radii = d / 2 * (1 + 0.05 * np.sin(5 * angles))
        draw.polygon(list(zip(c + radii * np.cos(angles), c + radii * np.sin(angles))), fill=COLOURS[colour])
    elif shape == "blunt triangle":
        top, bottom = c - d / 2, c + d / 2
        points = [(c - d / 2, bottom), (c + d / 2, bottom), (c + 0.08 * d, top), (c - 0.08 * d, top)]
        draw.polygon(points, fill=COLOURS[colour])
    elif shape == "leaning triangle":
        draw.polygon([(c - d / 2, c + d / 2), (c + d / 2, c + d / 2), (c + 0.12 * d, c - d / 2)], fill=COLOURS[colour])
    return blur(image)


@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize(
    "drawn, shape",
    [("rounded square", "square"), ("ellipse", "circle"), ("lumpy circle", "circle"),
     ("blunt triangle", "triangle"), ("leaning triangle", "triangle")],
)
def test_slightly_imperfect_shapes_are_recognised(drawn, shape, size):
    verdict = judge(_draw(drawn, size), f"a large blue {shape} in the center on a white background")
    assert verdict.correct, verdict.reasons


# ---------------------------------------------------------------- reports


def test_score_images_bookkeeping():
    circle = render(Scene((SceneObject("red", "circle", 0.5, 0.5, 0.3, "large"),), "white"))
    pair = render(
        Scene((SceneObject("red", "circle", 0.5, 0.25, 0.25), SceneObject("blue", "square", 0.5, 0.75, 0.25)), "white",
              relation="above")
    )
    left = render(Scene((SceneObject("blue", "triangle", 0.25, 0.5, 0.4, "large"),), "gray", "on the left"))
    held = render(Scene((SceneObject("orange", "circle", 0.5, 0.5, 0.25, "small"),), "black"))
    images = [circle, circle, pair, left, held, circle]
    prompts = [
        "a red circle",  # right: single
        "a red circle on a black background",  # wrong: single, background
        "a red circle above a blue square on a white background",  # right: two_objects, background
        ("a large blue triangle on the left", ("single", "position")),  # right, given as evaluation_prompts gives it
        "an orange circle",  # right: held out
        "a purple triangle",  # wrong: held out
    ]
    report = score_images(images, prompts)
    assert report["counts"] == {"overall": 4, "single": 3, "position": 1, "two_objects": 1, "background": 2, "held_out": 2}
    assert report["correct"] == {"overall": 3, "single": 2, "position": 1, "two_objects": 1, "background": 1, "held_out": 1}
    assert report["overall"] == 0.75 and report["single"] == pytest.approx(2 / 3) and report["background"] == 0.5
    assert report["held_out"] == 0.5 and report["position"] == 1.0
    assert [f["index"] for f in report["failures"]] == [1, 5]
    assert "held_out" in format_report(report) and "0.750" in format_report(report)
    only_single = score_images([circle], ["a red circle"])
    assert only_single["two_objects"] is None and only_single["held_out"] is None and only_single["overall"] == 1.0
    with pytest.raises(ValueError, match="images and prompts"):
        score_images([circle], [])


def test_evaluation_prompts_cover_every_category_and_flag_held_out_pairs():
    prompts = evaluation_prompts(50, seed=0)
    assert prompts == evaluation_prompts(50, seed=0) and prompts != evaluation_prompts(50, seed=1)
    assert len(prompts) == 50
    seen = set()
    for text, categories in prompts:
        spec = parse_prompt(text)
        assert categories == spec.categories and format_prompt(spec) == text
        assert ("held_out" in categories) == spec.held_out
        seen.update(categories)
    assert seen == {"single", "position", "two_objects", "background", "held_out"}
    assert {c for _, cats in evaluation_prompts(5) for c in cats} == seen
    with pytest.raises(ValueError, match="num"):
        evaluation_prompts(0)


def test_full_captions_of_ground_truth_score_perfectly():
    """score_images on renders and their own full captions: overall and held-out both 1 (scorer and world agree)."""
    images, prompts = [], []
    for scene in scenes(100, seed=6):
        images.append(render(scene, 64))
        prompts.append(full_caption(scene))
    report = score_images(images, prompts)
    assert report["overall"] == 1.0 and report["held_out"] == 1.0 and not report["failures"]


def test_judge_reads_an_image_file_and_names_a_missing_one(tmp_path):
    scene = sample_scene(np.random.default_rng(3), "train")
    path = tmp_path / "scene.png"
    render(scene, 64).save(path)
    assert judge(path, full_caption(scene)).correct and judge(str(path), full_caption(scene)).correct
    with pytest.raises(FileNotFoundError, match="missing.png"):
        judge(tmp_path / "missing.png", full_caption(scene))
