"""Captioned images on the device: a folder of images with `captions.txt` ('file<TAB>caption' per
line), and the image features the captioner reads (pooled feature and patch tokens of the bundle's
prompted image encoder at P = 0), computed in onnxruntime without torch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_client.bundle import Bundle
from edge_client.datasets import DatasetError
from edge_client.preprocess import ImagePreprocessor

CAPTIONS_FILE = "captions.txt"
BATCH = 64


@dataclass(frozen=True)
class CaptionedImages:
    paths: tuple[Path, ...]
    captions: tuple[str, ...]


def load_captioned_folder(folder: str | Path) -> CaptionedImages:
    """Images and captions listed in `folder/captions.txt`."""
    folder = Path(folder)
    index = folder / CAPTIONS_FILE
    if not index.is_file():
        raise DatasetError(f"{folder} has no {CAPTIONS_FILE} ('file<TAB>caption' per line)")
    paths, captions = [], []
    for number, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, tab, text = line.partition("\t")
        if not tab or not text.strip() or not (folder / name).is_file():
            raise DatasetError(f"{index} line {number}: expected an existing file, a tab and a caption")
        paths.append(folder / name)
        captions.append(text.strip())
    if not paths:
        raise DatasetError(f"{index} lists no images")
    return CaptionedImages(tuple(paths), tuple(captions))


def caption_features(
    bundle: Bundle,
    images: Iterable[Image.Image],
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(image_features [N,D], patch_tokens [N,T,Wv]) float32 of RGB images."""
    session = bundle.image_session_prompted("fp32", providers=providers, threads=threads)
    preprocess = ImagePreprocessor(bundle.preprocess)
    width = int(bundle.manifest["image_width"])
    features, patches, batch = [], [], []

    def flush() -> None:
        pixels = np.stack(batch)
        empty = np.zeros((len(batch), 0, width), dtype=np.float32)
        pooled, tokens = session.run(None, {"images": pixels, "prompt_tokens": empty})
        features.append(pooled)
        patches.append(tokens)
        batch.clear()

    for image in images:
        batch.append(preprocess(image))
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return np.concatenate(features), np.concatenate(patches)


def open_images(paths: Sequence[Path]) -> Iterable[Image.Image]:
    for path in paths:
        with Image.open(path) as image:
            yield image.convert("RGB")
