"""The Shapes world against docs/shapes.md: sampling, layout rules, rendering, captions, datasets, export."""
import itertools
import re

import numpy as np
import pytest

from latent_diffusion.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    OBJECT_COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    Scene,
    SceneObject,
    caption,
    export_imagefolder,
    format_prompt,
    full_caption,
    parse_prompt,
    render,
    sample_scene,
    shapes_dataset,
    shapes_stream,
    spec_from_scene,
)
from latent_diffusion.shapes.world import position_holds, relation_holds, render_array, shape_mask

HELD_OUT_PHRASES = ("purple triangle", "orange circle", "green square")


def scenes(n, seed=0, split="train"):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


# ---------------------------------------------------------------- tables


def test_palette_and_tables_are_the_spec():
    assert COLOURS["red"] == (230, 30, 30) and COLOURS["orange"] == (255, 140, 0)
    assert COLOURS["yellow"] == (250, 230, 20) and COLOURS["green"] == (30, 170, 50)
    assert COLOURS["blue"] == (30, 80, 230) and COLOURS["purple"] == (150, 40, 200)
    assert COLOURS["white"] == (255, 255, 255) and COLOURS["gray"] == (128, 128, 128) and COLOURS["black"] == (0, 0, 0)
    assert set(OBJECT_COLOURS) | set(BACKGROUNDS) == set(COLOURS)
    assert SHAPES == ("circle", "square", "triangle")
    assert set(HELD_OUT_PAIRS) == {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
    assert set(POSITIONS) == {"on the left", "on the right", "at the top", "at the bottom", "in the center"}
    assert set(RELATIONS) == {"above", "below", "to the left of", "to the right of"}


# ---------------------------------------------------------------- determinism


def test_sampling_and_rendering_are_deterministic():
    a, b = scenes(50, seed=7), scenes(50, seed=7)
    assert a == b
    assert all(np.array_equal(render_array(x), render_array(y)) for x, y in zip(a, b))
    assert a != scenes(50, seed=8)


def test_shapes_dataset_is_deterministic_for_a_seed():
    one, two = shapes_dataset(6, size=32, seed=3), shapes_dataset(6, size=32, seed=3)
    assert one.column_names == ["image", "text"] and len(one) == 6
    assert one["text"] == two["text"]
    assert all(np.array_equal(np.asarray(x["image"]), np.asarray(y["image"])) for x, y in zip(one, two))
    assert one[0]["image"].size == (32, 32) and one[0]["image"].mode == "RGB"
    assert one["text"] != shapes_dataset(6, size=32, seed=4)["text"]


# ---------------------------------------------------------------- sizes and rendering


def test_every_allowed_size_renders_in_exact_palette_colours():
    scene = scenes(1, seed=1)[0]
    palette = {tuple(c) for c in COLOURS.values()}
    for size in range(32, 513, 8):
        image = render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
    for size in (32, 64, 136, 512):
        for s in scenes(5, seed=size):
            colours = {tuple(c) for c in np.asarray(render(s, size)).reshape(-1, 3)}
            assert colours <= palette
            assert colours == {COLOURS[s.background]} | {COLOURS[o.colour] for o in s.objects}


@pytest.mark.parametrize("size", [0, 24, 31, 36, 520, 1024, 64.0, "64", True, None])
def test_bad_sizes_are_rejected_by_name(size):
    with pytest.raises(ValueError, match="size"):
        render(scenes(1)[0], size)
    with pytest.raises(ValueError, match="size"):
        shapes_dataset(2, size=size)


def test_bad_split_and_rng_are_rejected():
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "test")
    with pytest.raises(ValueError, match="rng"):
        sample_scene(0)


def test_shapes_are_drawn_as_the_spec_says():
    """A large square, disc and triangle at 128 px: box side d, fill and apex where the spec puts them."""
    d, size = 0.4, 128
    for shape, fill in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        scene = Scene((SceneObject("red", shape, 0.5, 0.5, d, "large"),), "white")
        mask = (render_array(scene, size) == COLOURS["red"]).all(-1)
        ys, xs = np.nonzero(mask)
        assert abs((xs.max() - xs.min() + 1) - d * size) <= 1 and abs((ys.max() - ys.min() + 1) - d * size) <= 1
        assert mask.sum() / (d * size) ** 2 == pytest.approx(fill, abs=0.04)
        if shape == "triangle":  # apex at the top centre, full base at the bottom
            assert mask[ys.min()].sum() <= 2 and abs(xs[ys == ys.min()].mean() - size / 2) <= 1
            assert mask[ys.max()].sum() >= d * size - 2


# ---------------------------------------------------------------- held-out pairs


def test_held_out_pairs_never_reach_the_training_split():
    rng = np.random.default_rng(11)
    for scene in scenes(3000, seed=11):
        assert not scene.held_out
        assert all((o.colour, o.shape) not in HELD_OUT_PAIRS for o in scene.objects)
        for text in (full_caption(scene), caption(scene, rng)):
            assert not any(phrase in text for phrase in HELD_OUT_PHRASES)
    texts = shapes_dataset(300, size=32, seed=5)["text"]
    assert not any(phrase in text for text in texts for phrase in HELD_OUT_PHRASES)


def test_heldout_split_always_holds_a_held_out_pair():
    held = scenes(500, seed=2, split="heldout")
    assert all(s.held_out for s in held)
    assert {p for s in held for p in ((o.colour, o.shape) for o in s.objects) if p in HELD_OUT_PAIRS} == set(HELD_OUT_PAIRS)
    assert any(s.held_out for s in scenes(500, seed=2, split="all"))


# ---------------------------------------------------------------- layout rules


def _boxes_apart(a, b):
    return abs(a.cx - b.cx) > (a.d + b.d) / 2 or abs(a.cy - b.cy) > (a.d + b.d) / 2


def test_layout_rules_hold_for_sampled_scenes():
    sample = scenes(3000, seed=4)
    for scene in sample:
        for o in scene.objects:
            assert o.d / 2 <= o.cx <= 1 - o.d / 2 and o.d / 2 <= o.cy <= 1 - o.d / 2  # wholly inside
        if len(scene.objects) == 1:
            (o,) = scene.objects
            lo, hi = {"small": (0.22, 0.28), "large": (0.38, 0.44)}[o.size]
            assert lo <= o.d <= hi and scene.relation is None
            assert scene.position is None or position_holds(o.cx, o.cy, scene.position)
        else:
            a, b = scene.objects
            assert a.size is None and b.size is None and 0.22 <= a.d <= 0.32 and 0.22 <= b.d <= 0.32
            assert (a.colour, a.shape) != (b.colour, b.shape)
            assert relation_holds(a.centre, b.centre, scene.relation) and _boxes_apart(a, b)
    kinds = {(len(s.objects), s.position, s.relation, s.background) for s in sample}
    assert {k[1] for k in kinds} == {None, *POSITIONS} and {k[2] for k in kinds} == {None, *RELATIONS}
    assert {k[3] for k in kinds} == set(BACKGROUNDS)


def test_rendered_shapes_never_overlap():
    size = 64
    centres = (np.arange(size) + 0.5) / size
    for scene in scenes(300, seed=9):
        masks = [shape_mask(o.shape, o.cx, o.cy, o.d, centres, centres) for o in scene.objects]
        if len(masks) == 2:
            assert not (masks[0] & masks[1]).any()
        image = render_array(scene, size)
        for o, mask in zip(scene.objects, masks):
            assert mask.sum() > 0 and (image[mask] == COLOURS[o.colour]).all()


# ---------------------------------------------------------------- captions

_OBJ = r"(a|an) ({c}) ({s})".format(c="|".join(OBJECT_COLOURS), s="|".join(SHAPES))
_SIZED = r"(a|an) ((small|large) )?({c}) ({s})".format(c="|".join(OBJECT_COLOURS), s="|".join(SHAPES))
_BG = r"( on a ({}) background)?".format("|".join(BACKGROUNDS))
GRAMMAR = re.compile(
    rf"^({_SIZED}( ({'|'.join(POSITIONS)}))?{_BG}|{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}{_BG})$"
)


def _articles_right(text):
    words = text.split()
    return all((w == "an") == (nxt == "orange") for w, nxt in zip(words, words[1:]) if w in ("a", "an"))


def test_captions_follow_the_grammar_and_parse_back():
    rng = np.random.default_rng(0)
    for scene in scenes(2000, seed=12, split="all"):
        full = full_caption(scene)
        assert parse_prompt(full) == spec_from_scene(scene)
        for text in (full, caption(scene, rng), caption(scene, rng, drop_optional=False)):
            assert GRAMMAR.match(text), text
            assert text == text.lower() and not text.endswith(".") and _articles_right(text)
            assert format_prompt(parse_prompt(text)) == text


def test_dropped_captions_stay_true_and_vary():
    rng = np.random.default_rng(1)
    kept = {"size": set(), "position": set(), "background": set()}
    for scene in scenes(1000, seed=13):
        full, short = spec_from_scene(scene), parse_prompt(caption(scene, rng))
        assert [(o.colour, o.shape) for o in short.objects] == [(o.colour, o.shape) for o in full.objects]
        assert short.relation == full.relation
        for part in ("position", "background"):
            assert getattr(short, part) in (None, getattr(full, part))
            if getattr(full, part) is not None:
                kept[part].add(getattr(short, part) is not None)
        for want, got in zip(full.objects, short.objects):
            assert got.size in (None, want.size)
            if want.size is not None:
                kept["size"].add(got.size is not None)
    assert all(seen == {True, False} for seen in kept.values())


def test_articles():
    one = Scene((SceneObject("orange", "square", 0.5, 0.5, 0.25, "small"),), "white", "in the center")
    assert full_caption(one) == "a small orange square in the center on a white background"
    two = Scene(
        (SceneObject("red", "circle", 0.5, 0.2, 0.25), SceneObject("orange", "triangle", 0.5, 0.7, 0.25)), "black",
        relation="above",
    )
    assert full_caption(two) == "a red circle above an orange triangle on a black background"


@pytest.mark.parametrize(
    "text",
    [
        "", "a orange circle", "an red circle", "a small red circle above a blue square", "a red hexagon",
        "a red circle on a pink background", "a red circle next to a blue square", "two red circles",
        "a red circle on the left on the right", "the red circle",
    ],
)
def test_parse_prompt_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_prompt(text)


def test_parse_prompt_forgives_case_spaces_and_a_full_stop():
    spec = parse_prompt("  A Large  Blue Triangle at the top. ")
    assert format_prompt(spec) == "a large blue triangle at the top"
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(3)


# ---------------------------------------------------------------- stream and export


def test_stream_matches_the_dataset_and_shards_cover_every_index():
    expected = shapes_dataset(10, size=32, seed=2)["text"]
    finite = shapes_stream(10, size=32, seed=2)
    assert [ex["text"] for ex in finite] == expected
    endless = shapes_stream(size=32, seed=2)
    first = list(itertools.islice(iter(endless), 12))
    assert [ex["text"] for ex in first[:10]] == expected and first[0]["image"].size == (32, 32)
    stream = shapes_stream(10, size=32, seed=2, num_shards=2)
    halves = [[ex["text"] for ex in stream.shard(num_shards=2, index=i)] for i in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(expected) and halves[0] == expected[0::2]


def test_export_imagefolder_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    out = export_imagefolder(tmp_path / "shapes", 12, size=32, seed=1)
    assert (out / "metadata.jsonl").exists() and len(list(out.glob("*.png"))) == 12
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert "text" in loaded.column_names and len(loaded) == 12
    reference = shapes_dataset(12, size=32, seed=1)
    assert sorted(loaded["text"]) == sorted(reference["text"])
    def pairs(ds):
        return sorted((ex["text"], np.asarray(ex["image"].convert("RGB")).tobytes()) for ex in ds)

    assert pairs(loaded) == pairs(reference)
    with pytest.raises(FileExistsError):
        export_imagefolder(out, 3, size=32)
    export_imagefolder(out, 3, size=32, overwrite=True)
    assert len(list(out.glob("*.png"))) == 3 and len((out / "metadata.jsonl").read_text().splitlines()) == 3


def test_counts_and_seeds_are_checked():
    with pytest.raises(ValueError, match="num_examples"):
        shapes_dataset(-1)
    with pytest.raises(ValueError, match="seed"):
        shapes_dataset(2, seed=-3)
    with pytest.raises(ValueError, match="num_shards"):
        shapes_stream(num_shards=0)
