"""Opens an exported bundle on the device: checks its hashes, gives onnxruntime sessions for the
frozen encoders and a torch text tower for gradient flow, without open_clip's model-building code.

The format is described in docs/architecture.md ("Bundle format").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import onnxruntime as ort
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file

from edge_client.providers import make_session
from edge_client.text_tower import FrozenTextTower, TextTowerSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEXT_TOWER_FILE = "text_tower.safetensors"
PRECISIONS = ("fp32", "fp16", "int8")


class BundleError(Exception):
    """A bundle cannot be used: missing, malformed, or not what this code understands."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing or its content does not match the sha256 in the manifest."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large encoders never sit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_file(tower: str, precision: str) -> str:
    """File name of an encoder graph: 'image_encoder.onnx', 'text_encoder.fp16.onnx', ..."""
    return f"{tower}_encoder.onnx" if precision == "fp32" else f"{tower}_encoder.{precision}.onnx"


class Bundle:
    """A verified bundle directory. Use `Bundle.open(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, check_hashes: bool = True) -> Bundle:
        """Read the manifest and (by default) check the sha256 of every file it lists."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"{manifest_path} is not valid JSON: {error}") from error
        if manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"{path}: bundle format version {manifest.get('format_version')!r} is not supported "
                f"(expected {FORMAT_VERSION}); re-export it with this version of fedprompt"
            )
        bundle = cls(path, manifest)
        if check_hashes:
            bundle.check_hashes()
        return bundle

    def check_hashes(self) -> None:
        """Raise BundleIntegrityError naming the first file that is missing or altered."""
        for name, entry in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise BundleIntegrityError(f"bundle {self.path}: {name} is missing")
            if sha256_file(file) != entry["sha256"]:
                raise BundleIntegrityError(
                    f"bundle {self.path}: {name} does not match its sha256 in {MANIFEST} "
                    "(corrupt or altered file; export the bundle again)"
                )

    @cached_property
    def digest(self) -> str:
        """sha256 of the manifest, which lists every file's sha256: one key for the whole bundle."""
        return sha256_file(self.path / MANIFEST)

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    @property
    def preprocess(self) -> dict[str, Any]:
        return dict(self.manifest["preprocess"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.manifest["context_length"])

    @property
    def logit_scale(self) -> float:
        return float(self.manifest["logit_scale"])

    def encoder_path(self, tower: str, precision: str | None = None) -> Path:
        """Path of the image or text encoder graph in `precision` (default: the bundle's default)."""
        precision = precision or self.manifest["default_precision"]
        name = encoder_file(tower, precision)
        if name not in self.manifest["files"]:
            raise BundleError(
                f"bundle {self.path} has no {precision} {tower} encoder (precisions: {self.precisions})"
            )
        return self.path / name

    def image_session(
        self, precision: str | None = None, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> ort.InferenceSession:
        """onnxruntime session of the image encoder: "images" [N,3,H,W] -> "image_features" [N,D]."""
        return make_session(self.encoder_path("image", precision), providers, threads)

    def text_session(
        self, precision: str | None = "fp32", providers: Sequence[str] | None = None
    ) -> ort.InferenceSession:
        """onnxruntime session of the text encoder (inference only; train through `text_tower()`)."""
        return make_session(self.encoder_path("text", precision), providers)

    def text_tower(self) -> FrozenTextTower:
        """The frozen torch text tower, rebuilt from text_tower.safetensors."""
        spec = TextTowerSpec.from_manifest(self.manifest["text_tower"])
        tensors = load_file(str(self.path / TEXT_TOWER_FILE))
        return FrozenTextTower(
            spec, tensors, eot_token_id=int(self.manifest["tokenizer"]["eot_token_id"])
        ).eval()

    def tokenizer(self) -> SimpleTokenizer:
        """open_clip's BPE tokenizer with the bundle's context length."""
        kind = self.manifest["tokenizer"]["kind"]
        if kind != "open_clip":
            raise BundleError(f"bundle {self.path}: tokenizer kind {kind!r} is not supported")
        return SimpleTokenizer(context_length=self.context_length)
