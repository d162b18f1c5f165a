"""Opens an exported bundle on the device: checks its hashes (and, when asked, its signature), gives
onnxruntime sessions for the frozen encoders, torch towers for gradient flow and the tokenizer,
without any open_clip code. Importing it imports no torch (caption generation runs without it);
the torch towers are imported when asked for.

The format (2) is described in docs/architecture.md ("Bundle format").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_client.bundle_signature import (
    SIGNATURE_FILE,
    KeyFileError,
    fingerprint,
    load_public_key,
    signing_key,
)
from edge_client.providers import make_session

if TYPE_CHECKING:
    from edge_client.caption_onnx import OnnxStepper
    from edge_client.caption_tokenizer import CaptionTokenizer
    from edge_client.captioner import Captioner
    from edge_client.image_tower import FrozenImageTower
    from edge_client.text_tower import FrozenTextTower
    from edge_client.tokenizer import ClipTokenizer

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TEXT_TOWER_FILE = "text_tower.safetensors"
IMAGE_TOWER_FILE = "image_tower.safetensors"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # open_clip's CLIP BPE vocabulary (MIT), copied by export
DECODER_FILE = "decoder.safetensors"
PROJECTION_FILE = "caption_projection.safetensors"
DECODER_TOKENIZER_FILE = "decoder_tokenizer.json"
PRECISIONS = ("fp32", "fp16", "int8")
REQUIRED_PARTS = ("image_encoder", "text_encoder", "text_tower")
MANIFEST_FIELDS = (  # every top-level field of a format-2 manifest
    "format_version",
    "model",
    "weights",
    "weights_source",
    "seed",
    "embed_dim",
    "text_width",
    "context_length",
    "vocab_size",
    "image_size",
    "image_width",
    "image_tokens",
    "preprocess",
    "tokenizer",
    "logit_scale",
    "text_tower",
    "capabilities",
    "parts",
    "opset",
    "precisions",
    "default_precision",
    "files",
    "versions",
    "parity",
)
GRAPH_PARTS = {
    "image": "image_encoder",
    "text": "text_encoder",
    "image_prompted": "image_encoder_prompted",
    "caption_encoder": "caption_encoder",
    "caption_decoder": "caption_decoder",
}


@dataclass(frozen=True)
class Capability:
    """What a bundle can do, which methods require by name: the parts it needs, and the words of
    the error when they are missing ("bundle X has no <lacks>: model M cannot <means>")."""

    parts: tuple[str, ...]
    lacks: str
    means: str


# A new capability is one entry here.
CAPABILITIES = {
    "text_prompts": Capability(("text_tower",), "text tower", "train text prompts"),
    "visual_prompts": Capability(
        ("image_tower", "image_encoder_prompted"), "visual-prompt image tower", "take visual prompts"
    ),
    "captioning": Capability(
        (
            "image_encoder_prompted",
            "caption_projection",
            "decoder",
            "decoder_tokenizer",
            "caption_encoder",
            "caption_decoder",
        ),
        "caption decoder",
        "write captions (export it with --decoder)",
    ),
}


class BundleError(Exception):
    """A bundle cannot be used: missing, malformed, or not what this code understands."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing or altered (sha256), or its signature is missing or not trusted."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large encoders never sit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def graph_file(part: str, precision: str) -> str:
    """File name of a part's ONNX graph: 'image_encoder.onnx', 'image_encoder_prompted.fp16.onnx', ..."""
    return f"{part}.onnx" if precision == "fp32" else f"{part}.{precision}.onnx"


def encoder_file(tower: str, precision: str) -> str:
    """File name of an encoder graph by tower ('image', 'text', 'image_prompted')."""
    return graph_file(GRAPH_PARTS[tower], precision)


def capabilities_of(parts: Mapping[str, Any]) -> list[str]:
    """The sorted capabilities whose parts are all present."""
    return sorted(name for name, needs in CAPABILITIES.items() if all(p in parts for p in needs.parts))


def referenced_files(manifest: Mapping[str, Any]) -> list[str]:
    """Every file the manifest's parts and tokenizer name."""
    names = [manifest["tokenizer"]["vocab"]]
    for part in manifest["parts"].values():
        names += [*part.get("files", {}).values(), *([part["file"]] if "file" in part else [])]
    return names


class Bundle:
    """A verified bundle directory. Use `Bundle.open(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(
        cls,
        path: str | Path,
        check_hashes: bool = True,
        trusted_keys: Sequence[str | Path | Ed25519PublicKey] | None = None,
    ) -> Bundle:
        """Read the manifest and (by default) check the sha256 of every file it lists. With
        `trusted_keys` (public key files or keys), manifest.sig must be a valid Ed25519 signature of
        manifest.json by one of them."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
        raw = manifest_path.read_bytes()
        if trusted_keys is not None:
            check_signature(path, raw, trusted_keys)
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"{manifest_path} is not valid JSON: {error}") from error
        if not isinstance(manifest, dict):
            raise BundleError(f"{manifest_path} is not a JSON object")
        _check_format(path, manifest)
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

    @property
    def capabilities(self) -> list[str]:
        return list(self.manifest["capabilities"])

    @property
    def parts(self) -> dict[str, dict[str, Any]]:
        return self.manifest["parts"]

    def require(self, capability: str) -> None:
        """One-line BundleError unless the bundle has `capability` (and the parts it needs)."""
        needs = CAPABILITIES.get(capability)
        if needs is None:
            raise BundleError(f"unknown bundle capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        if capability not in self.capabilities or not all(p in self.parts for p in needs.parts):
            model = self.manifest["model"]
            raise BundleError(f"bundle {self.path} has no {needs.lacks}: model {model} cannot {needs.means}")

    def encoder_path(self, tower: str, precision: str | None = None) -> Path:
        """Path of the 'image', 'text' or 'image_prompted' graph in `precision` (default: the
        bundle's default)."""
        part = GRAPH_PARTS[tower]
        if tower == "image_prompted":
            self.require("visual_prompts")
        if tower.startswith("caption_"):
            self.require("captioning")
        precision = precision or self.manifest["default_precision"]
        name = self.parts[part]["files"].get(precision)
        if name is None:
            raise BundleError(
                f"bundle {self.path} has no {precision} {tower.replace('_', ' ')} encoder "
                f"(precisions: {', '.join(self.parts[part]['files'])})"
            )
        return self.path / name

    def image_session(
        self, precision: str | None = None, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> ort.InferenceSession:
        """onnxruntime session of the image encoder: "images" [N,3,H,W] -> "image_features" [N,D]."""
        return make_session(self.encoder_path("image", precision), providers, threads)

    def image_session_prompted(
        self, precision: str | None = None, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> ort.InferenceSession:
        """onnxruntime session of the prompted image encoder: "images" [N,3,H,W] + "prompt_tokens"
        [N,P,Wv] (P >= 0) -> "image_features" [N,D], "patch_tokens" [N,T,Wv]."""
        return make_session(self.encoder_path("image_prompted", precision), providers, threads)

    def text_session(
        self, precision: str | None = "fp32", providers: Sequence[str] | None = None
    ) -> ort.InferenceSession:
        """onnxruntime session of the text encoder (inference only; train through `text_tower()`)."""
        return make_session(self.encoder_path("text", precision), providers)

    def text_tower(self) -> FrozenTextTower:
        """The frozen torch text tower, rebuilt from text_tower.safetensors."""
        from safetensors.torch import load_file

        from edge_client.text_tower import FrozenTextTower, TextTowerSpec

        part = self.parts["text_tower"]
        tensors = load_file(str(self.path / part["file"]))
        spec = TextTowerSpec.from_manifest(part["spec"])
        eot = int(self.manifest["tokenizer"]["eot_token_id"])
        return FrozenTextTower(spec, tensors, eot_token_id=eot).eval()

    def image_tower(self) -> FrozenImageTower:
        """The frozen torch ViT image tower that takes prompt tokens, rebuilt from image_tower.safetensors."""
        from safetensors.torch import load_file

        from edge_client.image_tower import FrozenImageTower, ImageTowerSpec

        self.require("visual_prompts")
        part = self.parts["image_tower"]
        tensors = load_file(str(self.path / part["file"]))
        return FrozenImageTower(ImageTowerSpec.from_manifest(part["spec"]), tensors).eval()

    @property
    def decoder_spec(self) -> dict[str, Any]:
        """The T5 network of the captioner (transformers' T5Config fields)."""
        self.require("captioning")
        return dict(self.parts["decoder"]["spec"])

    def captioner(self) -> Captioner:
        """The frozen torch captioner (projection + transformers' T5), for training prompts."""
        from safetensors.torch import load_file

        from edge_client.captioner import Captioner, CaptionProjection, ProjectionSpec, build_t5

        self.require("captioning")
        projection = CaptionProjection(ProjectionSpec.from_manifest(self.parts["caption_projection"]["spec"]))
        projection.load_state_dict(load_file(str(self.path / self.parts["caption_projection"]["file"])))
        t5 = build_t5(self.decoder_spec, load_file(str(self.path / self.parts["decoder"]["file"])))
        return Captioner(projection.eval().requires_grad_(False), t5).eval()

    def caption_stepper(
        self, providers: Sequence[str] | None = None, threads: int | None = None
    ) -> OnnxStepper:
        """Caption generation in onnxruntime (edge_client.caption_search steps it)."""
        from edge_client.caption_onnx import OnnxStepper

        return OnnxStepper(
            self.encoder_path("caption_encoder", "fp32"),
            self.encoder_path("caption_decoder", "fp32"),
            self.decoder_spec,
            providers,
            threads,
        )

    def caption_tokenizer(self) -> CaptionTokenizer:
        """The decoder's tokenizer (tokenizer.json via the `tokenizers` library)."""
        from edge_client.caption_tokenizer import CaptionTokenizer

        spec = self.decoder_spec
        path = self.path / self.parts["decoder_tokenizer"]["file"]
        return CaptionTokenizer(path, int(spec["eos_token_id"]), int(spec["pad_token_id"]))

    def tokenizer(self) -> ClipTokenizer:
        """CLIP's BPE tokenizer on the bundle's vocabulary file, with the bundle's context length."""
        from edge_client.tokenizer import ClipTokenizer

        entry = self.manifest["tokenizer"]
        if entry["kind"] != "open_clip":
            raise BundleError(f"bundle {self.path}: tokenizer kind {entry['kind']!r} is not supported")
        return ClipTokenizer(self.path / entry["vocab"], self.context_length)


def check_signature(
    path: Path, manifest_bytes: bytes, trusted_keys: Sequence[str | Path | Ed25519PublicKey]
) -> str:
    """The fingerprint of the trusted key that signed manifest.json; BundleIntegrityError otherwise."""
    try:
        keys = [k if isinstance(k, Ed25519PublicKey) else load_public_key(k) for k in trusted_keys]
    except KeyFileError as error:
        raise BundleError(str(error)) from error
    signature_path = path / SIGNATURE_FILE
    if not signature_path.is_file():
        raise BundleIntegrityError(f"bundle {path} is not signed ({SIGNATURE_FILE} is missing)")
    key = signing_key(manifest_bytes, signature_path.read_bytes(), keys)
    if key is None:
        names = ", ".join(fingerprint(k) for k in keys) or "none given"
        raise BundleIntegrityError(
            f"bundle {path}: {SIGNATURE_FILE} is not a valid signature of {MANIFEST} by a trusted key "
            f"(trusted: {names})"
        )
    return fingerprint(key)


def _check_format(path: Path, manifest: dict[str, Any]) -> None:
    version = manifest.get("format_version")
    if version == FORMAT_VERSION:
        try:
            _check_structure(path, manifest)
        except (KeyError, TypeError, AttributeError) as error:
            raise BundleError(
                f"bundle {path}: {MANIFEST} is malformed ({type(error).__name__}: {error})"
            ) from None
        return
    if version == 1:
        raise BundleError(
            f"bundle {path} is in format 1, which this fedprompt no longer reads; re-export it: "
            f"{reexport_command(path, manifest)}"
        )
    raise BundleError(
        f"bundle {path}: format version {version!r} is not supported (this fedprompt reads "
        f"{FORMAT_VERSION}); export it with this version of fedprompt"
    )


def _check_structure(path: Path, manifest: dict[str, Any]) -> None:
    """Every field present, every file a part uses listed with its sha256, file names plain."""
    missing = [key for key in MANIFEST_FIELDS if key not in manifest]
    missing += [f"parts.{part}" for part in REQUIRED_PARTS if part not in manifest.get("parts", {})]
    if missing:
        raise BundleError(f"bundle {path}: {MANIFEST} lacks {', '.join(missing)}")
    unlisted = sorted(set(referenced_files(manifest)) - set(manifest["files"]))
    if unlisted:
        raise BundleError(
            f"bundle {path}: {unlisted[0]} is used but not listed (with its sha256) in {MANIFEST}"
        )
    odd = [name for name in manifest["files"] if Path(name).name != name or name in ("", ".", "..")]
    if odd:
        raise BundleError(f"bundle {path}: file name {odd[0]!r} in {MANIFEST} is not a plain file name")


def reexport_command(path: Path, manifest: Mapping[str, Any]) -> str:
    """The `fedprompt export` command that rebuilds an older bundle in the current format."""
    source = manifest.get("weights_source") or {}
    weights = source.get("value") or "WEIGHTS"
    extra = "".join(f" --precision {p}" for p in manifest.get("precisions", []) if p != "fp32")
    return f"fedprompt export {manifest.get('model', 'MODEL')} --pretrained {weights} --out {path}{extra}"
