"""Images are read as viewers show them (EXIF rotation, 16-bit scaling) and bad image files get one line."""
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.apps.cli import main as cli_main
from latent_diffusion.formats.images import ImageReadError, read_image
from latent_diffusion.training.data import decode_image


def exif_rotated_jpeg(path):
    """A 40 wide × 20 high JPEG, left half red, tagged orientation 6 (viewers rotate it 90° clockwise: 20×40)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def grey16_png(path, value=32768):
    Image.fromarray(np.full((16, 16), value, np.uint16)).save(path)
    return path


def png_claiming(path, width, height):
    """A PNG whose header claims width × height pixels (a decompression bomb's header) with a tiny body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def truncated_png(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return path


def test_exif_rotation_is_applied_in_training_and_the_cli_reader(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "photo.jpg")
    assert Image.open(path).size == (40, 20)  # what PIL stores
    for image in (decode_image(str(path)), decode_image({"bytes": path.read_bytes(), "path": None}),
                  decode_image(Image.open(path)), read_image(path)):
        assert image.size == (20, 40) and image.mode == "RGB"
        top = np.asarray(image)[:10]  # rotated clockwise, the red left half is now the top
        assert top[..., 0].mean() > 200 and np.asarray(image)[30:, :, 0].mean() < 50


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = grey16_png(tmp_path / "grey.png")
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(Image.open(path).convert("RGB")).max() == 255  # PIL alone: clipped to white
    for image in (decode_image(str(path)), read_image(path)):
        assert np.asarray(image).mean() == pytest.approx(127.5, abs=1)
    assert np.asarray(read_image(grey16_png(tmp_path / "white.png", 65535))).min() == 255


@pytest.mark.parametrize("make, message", [
    (lambda p: png_claiming(p, 10_000, 9_000), "is 10000×9000 pixels; at most 67108864 pixels"),
    (lambda p: png_claiming(p, 100_000, 100_000), "is too large to decode (Image size (10000000000 pixels)"),
    (truncated_png, "cannot be decoded"),
    (lambda p: p.write_bytes(b"not an image at all" * 100) and p, "is not a readable image"),
], ids=["bomb", "huge_bomb", "truncated", "not_an_image"])
def test_bad_image_files(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageReadError, match=re.escape(message)):
        read_image(path)
    assert decode_image(str(path)) is None  # training skips it and counts it


@pytest.mark.parametrize("flag, make, message", [
    ("--image", lambda p: png_claiming(p, 10_000, 9_000), "is 10000×9000 pixels"),
    ("--image", truncated_png, "cannot be decoded"),
    ("--mask", lambda p: p.write_bytes(b"\0" * 1000) and p, "is not a readable image"),
    ("--image", lambda p: p.mkdir() or p, "no such file"),
], ids=["bomb", "truncated", "mask_not_an_image", "directory"])
def test_cli_image_inputs(tmp_path, capsys, flag, make, message):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32)).save(good)
    bad = make(tmp_path / "bad.png")
    files = {"--image": str(bad if flag == "--image" else good), "--mask": str(bad)} if flag == "--mask" else \
        {"--image": str(bad)}
    flags = [x for pair in files.items() for x in pair]
    assert cli_main(["generate", "a", "-o", str(tmp_path / "x.png"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"latent-diffusion generate: error: {flag}") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
