"""The `latent-diffusion` commands end every failure in one line: status 2 for usage, 1 for a failed run."""
import errno
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from latent_diffusion.apps.cli import main as cli_main
from test_lora_loading import lora_file, make_lora  # noqa: F401  (lora_file: fixture)


def generate(sd_folder, tmp_path, *flags):
    return cli_main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--quiet", "--steps", "1",
                     "--model", str(sd_folder), *map(str, flags)])


def last_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_lora_with_wrong_shapes(sd_folder, lora_file, tmp_path, capsys):  # noqa: F811
    tensors = load_file(str(lora_file))
    name = next(k for k in tensors if "lora.down" in k or "lora_A" in k)
    tensors[name] = tensors[name][:, :1].contiguous()  # a rank-4 adapter whose input width is wrong
    bad = tmp_path / "wrong_shapes.safetensors"
    save_file(tensors, str(bad))
    assert generate(sd_folder, tmp_path, "--lora", bad) == 2
    line = last_line(capsys)
    assert line.startswith(f"latent-diffusion generate: error: --lora {str(bad)!r}: ") and "size" in line.lower()


def test_truncated_lora(sd_folder, lora_file, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(open(lora_file, "rb").read()[:300])
    assert generate(sd_folder, tmp_path, "--lora", bad) == 2
    assert "truncated" in last_line(capsys)


def test_shapes_export_n_0(tmp_path, capsys):
    assert cli_main(["shapes-export", str(tmp_path / "data"), "--n", "0"]) == 2
    assert last_line(capsys) == "latent-diffusion shapes-export: error: --n must be an integer >= 1, got 0"
    assert not (tmp_path / "data").exists()


def test_output_folder_not_writable(sd_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as on a read-only mount (root ignores chmod)
    assert generate(sd_folder, tmp_path) == 2
    assert f"folder {str(tmp_path)!r} is not writable" in last_line(capsys)


def test_a_write_failure_is_one_line_status_1(sd_folder, tmp_path, capsys, monkeypatch):
    from latent_diffusion.formats import pngmeta

    def full(image, path, metadata):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pngmeta, "save_png", full)
    assert generate(sd_folder, tmp_path) == 1
    assert last_line(capsys) == (f"latent-diffusion generate: error: -o/--output {str(tmp_path / 'x.png')!r}: could not "
                                 f"write the image: No space left on device: {tmp_path / 'x.png'}")


def test_an_unexpected_error_is_one_line_status_1(sd_folder, tmp_path, capsys, monkeypatch):
    from latent_diffusion.pipelines import LatentDiffusionPipeline

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 20 GiB")

    monkeypatch.setattr(LatentDiffusionPipeline, "__call__", broken)
    assert generate(sd_folder, tmp_path) == 1
    assert last_line(capsys) == "latent-diffusion generate: error: RuntimeError: CUDA out of memory."
    monkeypatch.setenv("LATENT_DIFFUSION_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        generate(sd_folder, tmp_path)


def test_hub_id_while_offline(tmp_path):
    done = subprocess.run([sys.executable, "-m", "latent_diffusion.apps.cli", "generate", "a", "--model",
                           "nobody/no-such-model", "-o", str(tmp_path / "x.png"), "--quiet"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("latent-diffusion generate: error: ") and "nobody/no-such-model" in last
