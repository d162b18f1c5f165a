"""A small real ImageFolder for training tests: PNGs whose classes differ by colour and pattern."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def write_colour_folder(root: Path, per_class: int = 10, size: int = 32, seed: int = 0) -> Path:
    """`root/<colour>/<i>.png`: a noisy colour field with a complementary stripe of random height."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array(colour, np.float64)[None, None]
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            pixels[rng.integers(0, size) :, : size // 4] = 255 - np.array(colour, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
