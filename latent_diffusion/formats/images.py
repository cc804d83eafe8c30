"""Reading image files as people see them: EXIF orientation applied, 16-bit pixels scaled, sizes bounded.

PIL hands back the stored pixels: a phone photo with an EXIF orientation tag comes out sideways, and a
16-bit grayscale PNG (mode I;16 / I) turned into RGB is clipped to white above 255. Every viewer and
`datasets` show them rotated and scaled, so training data and the CLI's --image/--mask read through
`read_image`. The header's size is checked before decoding, so a decompression bomb costs nothing.
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from latent_diffusion.checks import MAX_IMAGE_SIDE

MAX_INPUT_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE  # 67 Mpx: above it, an input is a bomb or a mistake
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageReadError(ValueError):
    """An image input that cannot be read (not an image, truncated, too large); the message says which."""


def open_image(source: Union[str, os.PathLike, bytes, Any]) -> Image.Image:
    """A PIL image opened (not yet decoded) from a path, bytes or a file object; ImageReadError if it is not one."""
    try:
        with warnings.catch_warnings():  # PIL warns above 89 Mpx; as_seen refuses above MAX_INPUT_PIXELS itself
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"is too large to decode ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"is not a readable image ({type(error).__name__}: {error})") from None


def as_seen(image: Image.Image) -> Image.Image:
    """The decoded image upright (EXIF orientation applied) with 16-bit and float pixels scaled into 0…255."""
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        raise ImageReadError(f"is {width}×{height} pixels; at most {MAX_INPUT_PIXELS} pixels "
                             f"({MAX_IMAGE_SIDE}×{MAX_IMAGE_SIDE}) are read")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"cannot be decoded ({error})") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_MODES:
        image = _scale_to_8_bit(image)
    return image


def _scale_to_8_bit(image: Image.Image) -> Image.Image:
    """Mode I / I;16 (0…65535) → L by / 257, so 65535 is white and 32768 mid-grey; F taken as 0…1 or 0…255."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0
    else:
        scale = 1 / 257
    return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), mode="L")


def read_image(source: Union[str, os.PathLike, bytes, Any], mode: str = "RGB") -> Image.Image:
    """The image at `source` as a viewer shows it, converted to `mode`; ImageReadError saying what is wrong."""
    with open_image(source) as opened:
        return as_seen(opened).convert(mode)
