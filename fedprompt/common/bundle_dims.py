"""What the aggregator knows of the run's model: the bundle's digest, dimensions and capabilities,
read from its manifest.json alone (no model files, no torch), so that it can size and initialise
the global state before round 1 and tell devices which bundle the run uses."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class BundleDimsError(ValueError):
    """The named manifest cannot be read or lacks a dimension; the message is one line."""


@dataclass(frozen=True)
class BundleDims:
    digest: str  # sha256 of manifest.json: one key for the whole bundle (as `Bundle.digest`)
    model: str
    embed_dim: int
    text_width: int
    image_width: int | None  # None: the image tower cannot take visual prompts
    image_tokens: int | None
    capabilities: tuple[str, ...]
    decoder_width: int | None = None  # d_model of the captioning decoder (None: no decoder)

    @classmethod
    def read(cls, path: str | Path) -> BundleDims:
        """From a bundle folder or its manifest.json."""
        path = Path(path)
        manifest_path = path / MANIFEST if path.is_dir() else path
        try:
            raw = manifest_path.read_bytes()
            manifest = json.loads(raw)
        except OSError as error:
            raise BundleDimsError(
                f"cannot read the bundle manifest {manifest_path}: {error.strerror}"
            ) from None
        except ValueError as error:
            raise BundleDimsError(f"{manifest_path} is not a JSON manifest ({error})") from None
        return cls.from_manifest(manifest, hashlib.sha256(raw).hexdigest(), str(manifest_path))

    @classmethod
    def from_manifest(cls, manifest: Any, digest: str, where: str = "the manifest") -> BundleDims:
        if not isinstance(manifest, dict) or manifest.get("format_version") != 2:
            raise BundleDimsError(
                f"{where} is not a format-2 bundle manifest (re-export it with `fedprompt export`)"
            )
        try:
            return cls(
                digest=digest,
                model=str(manifest["model"]),
                embed_dim=_positive(manifest["embed_dim"]),
                text_width=_positive(manifest["text_width"]),
                image_width=None if manifest["image_width"] is None else _positive(manifest["image_width"]),
                image_tokens=None
                if manifest["image_tokens"] is None
                else _positive(manifest["image_tokens"]),
                capabilities=tuple(str(c) for c in manifest["capabilities"]),
                decoder_width=_decoder_width(manifest),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise BundleDimsError(
                f"{where} lacks a usable dimension ({type(error).__name__}: {error})"
            ) from None


def _decoder_width(manifest: dict[str, Any]) -> int | None:
    decoder = manifest.get("parts", {}).get("decoder")
    return None if decoder is None else _positive(decoder["spec"]["d_model"])


def _positive(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a positive integer")
    return value
