"""training/captions.py: kohya's caption rewriting (shuffle, keep tokens, tag dropout, prefix/suffix), sidecar
captions, and 2-step training runs with it, cached (fixed variants) and on the fly."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.training.captions import (caption_variants_of, expand_caption_column, kept_and_free_tags,
                                                rewrite_caption)
from latent_diffusion.training.settings import CaptionSettings
from test_training import train

CAPTION = "sks, 1girl, red hair, smile, outdoors"


def draws(settings, caption=CAPTION, n=200):
    return [rewrite_caption(caption, settings, torch.Generator().manual_seed(i)) for i in range(n)]


def test_defaults_leave_captions_alone():
    assert set(draws(CaptionSettings(), n=5)) == {CAPTION}


def test_shuffle_keeps_the_first_tokens_and_permutes_the_rest():
    out = draws(CaptionSettings(shuffle_caption=True, keep_tokens=1))
    assert all(c.startswith("sks, ") for c in out)
    assert all(sorted(c.split(", ")) == sorted(CAPTION.split(", ")) for c in out)
    assert len(set(out)) > 10  # 4! = 24 orders of the free tags
    assert Counter(c.split(", ")[1] for c in out).keys() == {"1girl", "red hair", "smile", "outdoors"}


def test_keep_tokens_separator_keeps_the_head_and_is_removed():
    settings = CaptionSettings(shuffle_caption=True, keep_tokens_separator="|||")
    out = draws(settings, "sks, 1girl ||| red hair, smile, outdoors")
    assert all(c.startswith("sks, 1girl, ") and "|||" not in c for c in out)
    assert len(set(out)) == 6
    assert rewrite_caption("a ||| b", CaptionSettings(keep_tokens_separator="|||"), torch.Generator()) == "a, b"


def test_tag_dropout_drops_free_tags_at_the_rate():
    out = draws(CaptionSettings(keep_tokens=1, caption_tag_dropout_rate=0.5), n=400)
    assert all(c.startswith("sks") for c in out)
    kept = sum(len(c.split(", ")) - 1 for c in out) / (4 * len(out))
    assert 0.42 < kept < 0.58
    assert all(c.split(", ")[1:] == [t for t in CAPTION.split(", ")[1:] if t in c.split(", ")] for c in out)  # order


def test_prefix_and_suffix_wrap_every_caption_but_not_the_empty_one():
    settings = CaptionSettings(shuffle_caption=True, caption_prefix="photo of", caption_suffix="best quality")
    assert all(c.startswith("photo of ") and c.endswith(" best quality") for c in draws(settings, n=20))
    assert rewrite_caption("", settings, torch.Generator()) == ""  # caption dropout stays the empty caption


def test_keep_tokens_beyond_the_caption_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"keep_tokens \(--keep_tokens\) is 3 but the caption 'a, b' has only 2"):
        kept_and_free_tags("a, b", CaptionSettings(shuffle_caption=True, keep_tokens=3))


def test_cached_variants_are_seeded_per_row_and_cycle_captions():
    settings = CaptionSettings(shuffle_caption=True, caption_variants=6)
    a = caption_variants_of(["x, y, z", "p, q, r"], settings, seed=1, row=4)
    assert a == caption_variants_of(["x, y, z", "p, q, r"], settings, seed=1, row=4)
    assert len(a) == 6 and all(set(v.split(", ")) == set("xyz") for v in a[::2])
    assert a != caption_variants_of(["x, y, z", "p, q, r"], settings, seed=1, row=5)


def test_expand_caption_column_gives_lists_and_a_new_fingerprint():
    import datasets

    ds = datasets.Dataset.from_dict({"image": ["a", "b"], "text": ["x, y, z", "u, v"]})
    out = expand_caption_column(ds, "text", CaptionSettings(shuffle_caption=True, caption_variants=3), seed=0)
    assert [len(cell) for cell in out["text"]] == [3, 3] and out._fingerprint != ds._fingerprint
    same = expand_caption_column(ds, "text", CaptionSettings(shuffle_caption=True, caption_variants=3), seed=0)
    assert same._fingerprint == out._fingerprint and same["text"] == out["text"]


def make_sidecar_folder(folder, n=4, size=(40, 36)):
    """n random PNGs with kohya sidecar captions (no metadata.jsonl)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"sks, tag{i}, red, blue, green\n")
    return folder


@pytest.mark.parametrize("cache", [True, False])
def test_two_steps_with_sidecar_captions_and_shuffled_tags(sd_folder, tmp_path, monkeypatch, cache):
    """A 2-step run on sidecar captions with shuffling: the text encoder sees the rewritten captions."""
    from latent_diffusion.training import cache as cache_module
    from latent_diffusion.training import train_text2img

    seen = []
    real = cache_module.encode_caption_tensors

    def spy(*args, **kwargs):
        seen.extend(kwargs["captions"] if "captions" in kwargs else args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_module, "encode_caption_tensors", spy)
    monkeypatch.setattr(train_text2img, "encode_caption_tensors", spy)
    data = make_sidecar_folder(tmp_path / "data")
    flags = ["--max_train_steps", "2", "--shuffle_caption", "--keep_tokens", "1", "--caption_prefix", "photo,",
             "--caption_variants", "3"] + ([] if cache else ["--no_cache"])
    train(sd_folder, str(data), tmp_path / "out", *flags)
    captions = [c for c in seen if c]
    assert captions and all(c.startswith("photo, sks, ") for c in captions)
    assert any(not c.split(", ")[2].startswith("tag") for c in captions)  # some order is shuffled
    if cache:
        assert len(captions) == 4 * 3  # 3 variants of each of the 4 images, encoded once
    else:
        assert len(captions) == 2 * 2  # batch 2 × 2 steps, encoded as they are drawn
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["unet"]
