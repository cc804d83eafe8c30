"""Control-image preprocessors: turn a user's own photo into the kind of image a ControlNet was trained on.

Canny edges (OpenCV's `cv2.Canny`, the detector the original Canny ControlNet was trained with): white edges on
black, as an RGB image. Thresholds default to 100 and 200, the values of the ControlNet paper's Canny model.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import PIL.Image

from latent_diffusion.checks import check_choice, check_finite

CANNY_LOW, CANNY_HIGH = 100, 200


def canny(image: PIL.Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> PIL.Image.Image:
    """The image's Canny edge map (hysteresis thresholds `low` < `high` on the gradient magnitude), as RGB."""
    import cv2

    check_finite("low", low, 0)
    check_finite("high", high, 0)
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high}) for Canny's hysteresis thresholds")
    gray = np.asarray(image.convert("L"))  # (H, W) uint8
    edges = cv2.Canny(gray, low, high)  # (H, W) in {0, 255}
    return PIL.Image.fromarray(np.stack([edges] * 3, axis=-1))


PREPROCESSORS: dict[str, Callable[[PIL.Image.Image], PIL.Image.Image]] = {"none": lambda image: image.convert("RGB"),
                                                                           "canny": canny}


def preprocess_control_image(name: str, image: PIL.Image.Image,
                             thresholds: Optional[tuple[float, float]] = None) -> PIL.Image.Image:
    """`image` through the preprocessor `name` ("none" keeps it, "canny": its edge map, with Canny's
    (low, high) `thresholds`, None: CANNY_LOW and CANNY_HIGH)."""
    check_choice("preprocess", name, tuple(PREPROCESSORS))
    if name == "canny" and thresholds is not None:
        return canny(image, *thresholds)
    return PREPROCESSORS[name](image)
