"""Captioned images on the device: a folder of images with `captions.txt` ('file<TAB>caption' per
line), and the image features the captioner reads (pooled feature and patch tokens of the bundle's
prompted image encoder at P = 0), computed in onnxruntime without torch."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge_client.bundle import Bundle
from edge_client.datasets import DatasetError
from edge_client.features import FeatureCache, FeatureStats
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


def caption_features_key(bundle: Bundle) -> str:
    """Identity of image -> (pooled feature, patch tokens): the prompted encoder's sha256 and the
    preprocessing."""
    name = bundle.encoder_path("image_prompted", "fp32").name
    identity = {
        "encoder_sha256": bundle.manifest["files"][name]["sha256"],
        "preprocess": bundle.preprocess,
        "outputs": "image_features+patch_tokens",
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cached_caption_features(
    bundle: Bundle, paths: Sequence[Path], cache_dir: Path, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, FeatureStats]:
    """caption_features of image files, computing only what `cache_dir` lacks (keyed by each
    file's content sha256, as the classification features are): the encoder is frozen, so an
    image is encoded once per device, whatever the round."""
    cache = FeatureCache(cache_dir, caption_features_key(bundle))
    cached, rebuilt = cache.read()
    digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest().encode() for p in paths]
    missing = sorted({d: i for i, d in enumerate(digests) if d not in cached}.values())
    if missing:
        features, patches = caption_features(bundle, open_images([paths[i] for i in missing]), threads)
        flat = np.concatenate([features, patches.reshape(len(missing), -1)], axis=1)
        cached.update((digests[i], row) for i, row in zip(missing, flat, strict=True))
        cache.write(cached)
    rows = np.stack([cached[d] for d in digests]).astype(np.float32)
    dim, width = bundle.embed_dim, int(bundle.manifest["image_width"])
    stats = FeatureStats(hits=len(paths) - len(missing), computed=len(missing), rebuilt=rebuilt)
    return rows[:, :dim], rows[:, dim:].reshape(len(paths), -1, width), stats
