"""The latent cache checks what it stores: a checksum per file in the manifest, verified on load, rebuilt on failure."""
import json
import warnings

import pytest
import torch

from latent_diffusion.training.cache import MANIFEST, verify_cache
from test_cache import build, dataset, parts  # noqa: F401  (fixtures)

SHARD = "shard-00000-of-00001.safetensors"


def overwrite_bytes(folder):
    path = folder / SHARD
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x7f" * 8  # the last tensor's last bytes: still a loadable file, different numbers
    path.write_bytes(bytes(data))


def truncate(folder):
    path = folder / SHARD
    path.write_bytes(path.read_bytes()[:100])


def corrupt_manifest(folder):
    (folder / MANIFEST).write_text('{"format": 2, "shards": [')


def wrong_manifest_type(folder):
    (folder / MANIFEST).write_text(json.dumps(["not", "an", "object"]))


def remove_empty(folder):
    (folder / "empty.safetensors").unlink()


CORRUPTIONS = [
    (overwrite_bytes, "fails its sha256 checksum"),
    (truncate, "has 100 bytes, not the"),
    (corrupt_manifest, "its manifest is unreadable (JSONDecodeError)"),
    (wrong_manifest_type, "its manifest is unreadable"),
    (remove_empty, "empty.safetensors is missing"),
]


def test_a_fresh_cache_verifies(tmp_path, parts, dataset):  # noqa: F811
    build(tmp_path / "c", dataset, parts)
    assert verify_cache(str(tmp_path / "c" / "k")) is None
    manifest = json.loads((tmp_path / "c" / "k" / MANIFEST).read_text())
    assert set(manifest["files"]) == {SHARD, "empty.safetensors"} and len(manifest["files"][SHARD]["sha256"]) == 64


@pytest.mark.parametrize("corrupt, reason", CORRUPTIONS, ids=[c[0].__name__ for c in CORRUPTIONS])
def test_a_corrupt_cache_is_rebuilt_not_trained_on(tmp_path, parts, dataset, corrupt, reason):  # noqa: F811
    good, _ = build(tmp_path / "c", dataset, parts)
    folder = tmp_path / "c" / "k"
    corrupt(folder)
    assert reason in verify_cache(str(folder))
    with pytest.warns(UserWarning, match="rebuilding it"):
        again, hit = build(tmp_path / "c", dataset, parts)
    assert not hit and torch.equal(again.latent_mean, good.latent_mean) and torch.equal(again.latent_std, good.latent_std)
    assert verify_cache(str(folder)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build(tmp_path / "c", dataset, parts)[1]  # a hit again, silently
