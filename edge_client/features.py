"""Image features computed once with onnxruntime and cached on disk.

The image encoder is frozen, so a client never needs to run it twice on the same image: features
are keyed by the encoder (its file's sha256, the precision and the preprocessing) and by each
image's content sha256, so renamed or re-split files still hit and an edited image misses. A
cache file that cannot be read or fails its checksum is thrown away and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_client.bundle import Bundle, encoder_file
from edge_client.datasets import ImageSet
from edge_client.preprocess import ImagePreprocessor
from fedprompt.common.files import write_atomically

log = logging.getLogger(__name__)
DIGEST_DTYPE = "S64"  # hex sha256


@dataclass(frozen=True)
class FeatureStats:
    """How a request was served, for logs and tests."""

    hits: int
    computed: int
    rebuilt: bool


def encoder_key(bundle: Bundle, precision: str, flip: bool = False) -> str:
    """Identity of the function image -> features: encoder file hash, precision, preprocessing
    (and the horizontal flip of the preprocessed image, when asked)."""
    bundle.encoder_path("image", precision)  # the bundle's own clear error if it lacks this precision
    entry = bundle.manifest["files"][encoder_file("image", precision)]
    identity = {"encoder_sha256": entry["sha256"], "precision": precision, "preprocess": bundle.preprocess}
    if flip:
        identity["transform"] = "hflip"
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _checksum(digests: np.ndarray, features: np.ndarray) -> bytes:
    return hashlib.sha256(digests.tobytes() + features.tobytes()).hexdigest().encode()


class FeatureCache:
    """One file per encoder key holding (image digests [M], features [M, D]) with a checksum."""

    def __init__(self, directory: Path, key: str) -> None:
        self.path = Path(directory) / f"image-features-{key[:32]}.npz"

    def read(self) -> tuple[dict[bytes, np.ndarray], bool]:
        """The cached features by digest, and whether a corrupt file had to be dropped."""
        if not self.path.exists():
            return {}, False
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                digests, features = stored["digests"], stored["features"]
                checksum = bytes(stored["checksum"])
            if checksum != _checksum(digests, features) or len(digests) != len(features):
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            log.warning("feature cache %s is corrupt (%s); rebuilding it", self.path, error)
            self.path.unlink(missing_ok=True)
            return {}, True
        return dict(zip(digests.tolist(), features, strict=True)), False

    def write(self, entries: dict[bytes, np.ndarray]) -> None:
        """Replace the file atomically so that a crash leaves the old or the new cache, whole."""
        digests = np.array(list(entries), dtype=DIGEST_DTYPE)
        features = np.stack(list(entries.values())).astype(np.float32)
        buffer = io.BytesIO()
        np.savez(buffer, digests=digests, features=features, checksum=np.array(_checksum(digests, features)))
        write_atomically(self.path, buffer.getvalue())


def image_features(
    images: ImageSet,
    bundle: Bundle,
    cache_dir: Path,
    precision: str | None = None,
    providers: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    flip: bool = False,
) -> tuple[np.ndarray, FeatureStats]:
    """Features [N, D] float32 (not normalised) of every image, computing only cache misses; with
    `flip`, of each preprocessed image flipped left-right (cached under its own key)."""
    precision = precision or bundle.manifest["default_precision"]
    cache = FeatureCache(cache_dir, encoder_key(bundle, precision, flip))
    cached, rebuilt = cache.read()
    digests = [images.content_digest(i).encode() for i in range(len(images))]
    hits = sum(d in cached for d in digests)
    missing = sorted({d: i for i, d in enumerate(digests) if d not in cached}.values())  # one per digest
    if missing:
        session = bundle.image_session(precision, providers)
        preprocess = ImagePreprocessor(bundle.preprocess)
        starts = range(0, len(missing), batch_size)
        for start in tqdm(starts, desc="image features", unit="batch", disable=not progress, leave=False):
            batch = missing[start : start + batch_size]
            pixels = np.stack([preprocess(images.rgb(i)) for i in batch])
            if flip:
                pixels = np.ascontiguousarray(pixels[..., ::-1])
            (features,) = session.run(["image_features"], {"images": pixels})
            cached.update((digests[i], row) for i, row in zip(batch, features, strict=True))
        cache.write(cached)
    stats = FeatureStats(hits=hits, computed=len(missing), rebuilt=rebuilt)
    return np.stack([cached[d] for d in digests]).astype(np.float32), stats
