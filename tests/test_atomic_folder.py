"""`latent_diffusion.formats.atomic.atomic_folder`: a folder appears whole or not at all, and replaces an older one."""
import pytest

from latent_diffusion.formats.atomic import atomic_folder, write_text_atomic


def test_atomic_folder_replaces_the_old_folder_only_when_complete(tmp_path):
    target = tmp_path / "model"
    write_text_atomic(target / "old.txt", "old")
    with atomic_folder(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").is_file() and not (target / "new.txt").exists()  # readers still see the old one
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_atomic_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "model"
    write_text_atomic(target / "old.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_folder_creates_missing_parents(tmp_path):
    with atomic_folder(tmp_path / "a" / "b") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "b" / "x").read_text() == "x"
