"""The bundle's image preprocessing (manifest "preprocess") in PIL + numpy, without torchvision.

Follows what open_clip's eval transform does to a PIL image: resize (shortest side to `resize`, or
both sides with "squash"), centre crop to `crop`, scale to [0, 1], normalise by mean and std.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
RESIZE_MODES = ("shortest", "squash")


class PreprocessError(ValueError):
    """The manifest asks for a preprocessing this client does not implement."""


class ImagePreprocessor:
    """PIL RGB image -> float32 [3, crop, crop] array, as the image encoder expects."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        mode = settings.get("resize_mode", "shortest")
        interpolation = settings.get("interpolation", "bicubic")
        if mode not in RESIZE_MODES:
            raise PreprocessError(
                f"resize mode {mode!r} is not supported (supported: {', '.join(RESIZE_MODES)})"
            )
        if interpolation not in INTERPOLATIONS:
            raise PreprocessError(f"interpolation {interpolation!r} is not supported")
        self.resize = int(settings["resize"])
        self.crop = int(settings["crop"])
        self.mode = mode
        self.resample = INTERPOLATIONS[interpolation]
        self.mean = np.asarray(settings["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(settings["std"], np.float32).reshape(3, 1, 1)

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        width, height = image.size
        if self.mode == "squash":
            size = (self.resize, self.resize)
        else:
            short, long = sorted((width, height))
            scaled = (self.resize, int(self.resize * long / short))
            size = scaled if width <= height else scaled[::-1]
        if size != (width, height):
            image = image.resize(size, self.resample)
        left = round((size[0] - self.crop) / 2)
        top = round((size[1] - self.crop) / 2)
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std
