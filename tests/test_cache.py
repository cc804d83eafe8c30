"""The latent/embedding cache: keys, build and load, sharding, flips, caption dropout, unreadable rows."""
import os
import threading

import pytest
import torch

from latent_diffusion.training.cache import (CachedSamples, build_or_load_cache, cache_key, encode_captions,
                                    encode_latent_moments)
from latent_diffusion.training.data import ImageTransform, decode_image, load_caption_dataset, sample_generator
from latent_diffusion.tiny import tiny_components
from test_data import make_imagefolder


@pytest.fixture(scope="module")
def parts():
    return tiny_components()


@pytest.fixture()
def dataset(tmp_path):
    folder = make_imagefolder(tmp_path / "d", 5, broken=(3,))
    return load_caption_dataset(train_data_dir=str(folder))


def build(root, ds, parts, key="k", random_flip=True, **kw):
    transform = ImageTransform(32, center_crop=True, random_flip=random_flip)
    return build_or_load_cache(str(root), key, ds, vae=parts["vae"], text_encoder=parts["text_encoder"],
                               tokenizer=parts["tokenizer"], transform=transform,
                               image_column="image", caption_column="text", batch_size=2, **kw)


def test_key_changes_with_every_input(parts, dataset):
    base = dict(resolution=32, center_crop=True, dataset_fingerprint=dataset._fingerprint)
    key = cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"], **base)
    assert key == cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"], **base)
    changed = [
        cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"], **{**base, "resolution": 64}),
        cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"], **{**base, "center_crop": False}),
        cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"], **{**base, "random_flip": False}),
        cache_key(parts["vae"], parts["text_encoder"], parts["tokenizer"],
                  **{**base, "dataset_fingerprint": dataset.select([0, 1])._fingerprint}),
    ]
    other = tiny_components(seed=1)
    changed.append(cache_key(other["vae"], parts["text_encoder"], parts["tokenizer"], **base))
    changed.append(cache_key(parts["vae"], other["text_encoder"], parts["tokenizer"], **base))
    assert key not in changed and len(set(changed)) == len(changed)


def test_build_then_hit_and_contents(tmp_path, parts, dataset):
    cache, hit = build(tmp_path / "c", dataset, parts)
    assert not hit and cache.indices.tolist() == [0, 1, 2, 4] and cache.unreadable.tolist() == [3]
    assert cache.latent_mean.shape == (4, 2, 4, 16, 16) and cache.text_embeds.shape[0] == 4
    again, hit = build(tmp_path / "c", dataset, parts)
    assert hit and torch.equal(again.latent_mean, cache.latent_mean)
    # the cached moments are those of the centre-cropped image, and of its mirror image
    pixels = ImageTransform(32, center_crop=True)(decode_image(dataset[2]["image"]), sample_generator(0, 2, -1))
    mean, std = encode_latent_moments(parts["vae"], torch.stack([pixels, pixels.flip(-1)]))
    torch.testing.assert_close(cache.latent_mean[2], mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.latent_std[2], std, atol=1e-5, rtol=1e-5)
    expected = encode_captions(parts["tokenizer"], parts["text_encoder"], [dataset[2]["text"]])[0]
    torch.testing.assert_close(cache.text_embeds[2], expected, atol=1e-5, rtol=1e-5)


def test_two_ranks_build_disjoint_shards_and_load_the_same(tmp_path, parts, dataset):
    barrier = threading.Barrier(2)
    results = [None, None]

    def rank(r):
        results[r] = build(tmp_path / "c", dataset, parts, rank=r, world_size=2, barrier=barrier.wait)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    files = sorted(os.listdir(tmp_path / "c" / "k"))
    assert files == ["empty.safetensors", "manifest.json", "shard-00000-of-00002.safetensors",
                     "shard-00001-of-00002.safetensors"]
    (a, _), (b, _) = results
    single, _ = build(tmp_path / "single", dataset, parts)
    assert torch.equal(a.indices, single.indices) and torch.equal(a.latent_mean, b.latent_mean)
    torch.testing.assert_close(a.latent_mean, single.latent_mean)
    torch.testing.assert_close(a.text_embeds, single.text_embeds)


def test_samples_flip_and_caption_dropout(tmp_path, parts, dataset):
    cache, _ = build(tmp_path / "c", dataset, parts)
    plain = CachedSamples(cache, random_flip=False).__getitems__([(0, e) for e in range(16)])
    assert all(torch.equal(m, cache.latent_mean[0, 0]) for m in plain["latent_mean"])
    flipped = CachedSamples(cache, random_flip=True).__getitems__([(0, e) for e in range(16)])
    sides = {int(torch.equal(m, cache.latent_mean[0, 1])) for m in flipped["latent_mean"]}
    assert sides == {0, 1}
    dropped = CachedSamples(cache, caption_dropout=1.0).__getitems__([(1, 0), (2, 0)])
    assert all(torch.equal(e, cache.empty_embed) for e in dropped["text_embeds"])
    empty = encode_captions(parts["tokenizer"], parts["text_encoder"], [""])[0]
    torch.testing.assert_close(cache.empty_embed, empty)


def test_without_random_flip_the_cache_holds_only_unflipped_latents(tmp_path, parts, dataset):
    flipping, _ = build(tmp_path / "a", dataset, parts)
    plain, _ = build(tmp_path / "b", dataset, parts, random_flip=False)
    assert plain.latent_mean.shape == (4, 1, 4, 16, 16) and plain.latent_std.shape == (4, 1, 4, 16, 16)
    torch.testing.assert_close(plain.latent_mean[:, 0], flipping.latent_mean[:, 0], atol=1e-5, rtol=1e-5)
    items = CachedSamples(plain, random_flip=False).__getitems__([(0, e) for e in range(4)])
    assert all(torch.equal(m, plain.latent_mean[0, 0]) for m in items["latent_mean"])
    with pytest.raises(ValueError, match="random_flip"):
        CachedSamples(plain, random_flip=True)


def test_list_captions_cache_every_variant(tmp_path, parts):
    import datasets

    ds = load_caption_dataset(train_data_dir=str(make_imagefolder(tmp_path / "d", 2)))
    ds = ds.remove_columns("text").add_column("text", [["a cat on a sofa", "a red circle"], ["a small green square"]])
    ds = ds.cast_column("text", datasets.Sequence(datasets.Value("string")))
    cache, _ = build(tmp_path / "c", ds, parts)
    assert cache.caption_offsets.tolist() == [0, 2, 3] and cache.text_embeds.shape[0] == 3
    picked = CachedSamples(cache).__getitems__([(0, e) for e in range(20)])["text_embeds"]
    assert {int(torch.equal(e, cache.text_embeds[1])) for e in picked} == {0, 1}  # both variants get drawn
