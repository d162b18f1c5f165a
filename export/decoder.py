"""The text decoder of a captioning bundle (`fedprompt export --decoder`): where it comes from (the
embedded tiny captioner, a local Hugging Face T5-family folder, or a hub tag), loaded with
transformers, plus the projection from CLIP image features to its input space (trained with the
embedded captioner; seeded random for any other T5, which then needs training before it captions)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from edge_client.bundle import (
    DECODER_FILE,
    DECODER_TOKENIZER_FILE,
    PROJECTION_FILE,
    graph_file,
    sha256_file,
)
from edge_client.captioner import CaptionProjection, ProjectionSpec, build_t5, t5_spec, t5_tensors
from edge_client.image_tower import ImageTowerSpec
from export.errors import UnsupportedModelError, WeightsUnavailableError
from export.models import _download_host, _first_line, _reachable

TINY_CAPTIONER = "fedprompt-tiny-captioner"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TINY_FILES = {
    "weights": f"{TINY_CAPTIONER}.safetensors",
    "provenance": f"{TINY_CAPTIONER}.json",
    "tokenizer": f"{TINY_CAPTIONER}.tokenizer.json",
}
PROJECTION_SEED_OFFSET = 1  # the random projection's seed is the bundle's seed + 1


@dataclass(frozen=True)
class DecoderSource:
    """Where the decoder comes from, as recorded in the manifest (verify reloads it from there)."""

    kind: str  # "embedded", "path" or "hub"
    value: str
    sha256: str | None  # of the weights (embedded) or of the folder's files (path, hub snapshot)


@dataclass
class LoadedDecoder:
    source: DecoderSource
    t5: nn.Module
    tokenizer_json: str
    projection: CaptionProjection
    projection_init: str  # "trained" or "random"


def parse_decoder(text: str) -> DecoderSource:
    """`fedprompt-tiny-captioner`, an existing local folder, or a hub tag `org/name`."""
    if text == TINY_CAPTIONER:
        return DecoderSource("embedded", TINY_CAPTIONER, sha256_file(WEIGHTS_DIR / TINY_FILES["weights"]))
    path = Path(text).expanduser()
    if path.is_dir():
        return DecoderSource("path", str(path.resolve()), folder_digest(path))
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise WeightsUnavailableError(
            f"--decoder {text}: not {TINY_CAPTIONER}, an existing T5 folder or a hub tag "
            "like google/flan-t5-small"
        )
    return DecoderSource("hub", text, None)


def folder_digest(folder: Path) -> str:
    """sha256 over the names and sha256 of a checkpoint folder's files (config, weights, tokenizer)."""
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")):
        digest.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def hub_folder(tag: str) -> Path:
    """The hub snapshot of `tag` (cached, or downloaded when the hub is reachable); one line offline."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "spiece.model"]
    try:
        return Path(snapshot_download(tag, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the cache: the hub client raises several types for that
        pass
    host = _download_host({"hf_hub": tag})
    hint = f"pass a local folder instead: --decoder /path/to/{tag.split('/')[-1]}"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not _reachable(host):
        raise WeightsUnavailableError(
            f"cannot download decoder {tag!r} ({host} is unreachable, offline?); {hint}"
        )
    try:
        return Path(snapshot_download(tag, allow_patterns=patterns))
    except Exception as error:  # the hub raises many types; all mean "not available"
        raise WeightsUnavailableError(
            f"cannot download decoder {tag!r}: {_first_line(error)}; {hint}"
        ) from error


def projection_spec(embed_dim: int, image_spec: ImageTowerSpec | None, d_model: int) -> ProjectionSpec:
    """The projection's shape for this CLIP model; captioning reads patch tokens, so it needs a ViT."""
    if image_spec is None:
        raise UnsupportedModelError(
            "--decoder needs a ViT image tower (the captioner reads its patch tokens); this model has none"
        )
    return ProjectionSpec(embed_dim, image_spec.width, image_spec.tokens, d_model)


def load_decoder(
    source: DecoderSource, embed_dim: int, image_spec: ImageTowerSpec | None, seed: int
) -> LoadedDecoder:
    """The decoder's T5 (fp32, eval), its tokenizer.json text and the projection for this CLIP model."""
    if source.kind == "embedded":
        return _load_tiny(source, embed_dim, image_spec)
    folder = Path(source.value) if source.kind == "path" else hub_folder(source.value)
    if source.kind == "path" and not folder.is_dir():
        raise WeightsUnavailableError(f"decoder folder {folder} (named in the manifest) is missing")
    if source.kind == "path" and source.sha256 and folder_digest(folder) != source.sha256:
        raise WeightsUnavailableError(f"decoder folder {folder} changed since export (sha256 differs)")
    t5, tokenizer_json = _load_folder(folder)
    spec = projection_spec(embed_dim, image_spec, int(t5.config.d_model))
    torch.manual_seed(seed + PROJECTION_SEED_OFFSET)
    projection = CaptionProjection(spec).eval().requires_grad_(False)
    recorded = source if source.kind != "hub" else DecoderSource("hub", source.value, folder_digest(folder))
    return LoadedDecoder(recorded, t5, tokenizer_json, projection, "random")


def _load_folder(folder: Path) -> tuple[nn.Module, str]:
    from transformers import AutoConfig, AutoTokenizer, T5ForConditionalGeneration
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would break export's one bar
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise WeightsUnavailableError(f"decoder folder {folder}: {_first_line(error)}") from error
    if config.model_type not in ("t5", "mt5"):
        raise UnsupportedModelError(
            f"decoder {folder} is a {config.model_type!r} model; only T5-family encoder-decoders "
            "are supported"
        )
    try:
        model = T5ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise WeightsUnavailableError(f"decoder folder {folder}: {_first_line(error)}") from error
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(f"decoder folder {folder} has no fast (tokenizer.json) tokenizer")
    # The device rebuilds the T5 from the manifest's spec: that rebuild must compute what
    # transformers' own loaded model computes.
    rebuilt = build_t5(t5_spec(model.config), t5_tensors(model))
    _check_rebuild(folder, model.eval(), rebuilt)
    return rebuilt, backend.to_str()


@torch.no_grad()
def _check_rebuild(folder: Path, loaded: nn.Module, rebuilt: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 5, loaded.config.d_model, generator=generator)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 4), generator=generator)
    expected = loaded(inputs_embeds=embeds, decoder_input_ids=ids).logits
    actual = rebuilt(inputs_embeds=embeds, decoder_input_ids=ids).logits
    if (actual - expected).abs().max() > 1e-5 * max(expected.abs().max().item(), 1.0):
        raise UnsupportedModelError(
            f"decoder {folder}: the T5 rebuilt from its config fields differs from transformers' model "
            "(a setting fedprompt does not record)"
        )


def _load_tiny(source: DecoderSource, embed_dim: int, image_spec: ImageTowerSpec | None) -> LoadedDecoder:
    if sha256_file(WEIGHTS_DIR / TINY_FILES["weights"]) != source.sha256:
        raise WeightsUnavailableError(f"{TINY_CAPTIONER}'s weights changed since export (sha256 differs)")
    provenance = json.loads((WEIGHTS_DIR / TINY_FILES["provenance"]).read_text())
    tensors = load_file(str(WEIGHTS_DIR / TINY_FILES["weights"]))
    t5 = build_t5(provenance["t5"], {k[3:]: v.float() for k, v in tensors.items() if k.startswith("t5.")})
    spec = projection_spec(embed_dim, image_spec, int(t5.config.d_model))
    if spec.to_manifest() != provenance["projection"]:
        raise UnsupportedModelError(
            f"{TINY_CAPTIONER} reads {provenance['clip_model']}'s image features "
            f"({provenance['projection']}); this model gives {spec.to_manifest()}"
        )
    projection = CaptionProjection(spec)
    projection.load_state_dict({k[11:]: v.float() for k, v in tensors.items() if k.startswith("projection.")})
    tokenizer_json = (WEIGHTS_DIR / TINY_FILES["tokenizer"]).read_text()
    return LoadedDecoder(source, t5, tokenizer_json, projection.eval().requires_grad_(False), "trained")


def decoder_parts(decoder: LoadedDecoder) -> dict[str, dict[str, Any]]:
    """The manifest parts of the captioning capability."""
    return {
        "caption_projection": {
            "file": PROJECTION_FILE,
            "spec": decoder.projection.spec.to_manifest(),
            "init": decoder.projection_init,
        },
        "decoder": {
            "file": DECODER_FILE,
            "spec": t5_spec(decoder.t5.config),
            "source": asdict(decoder.source),
        },
        "decoder_tokenizer": {"file": DECODER_TOKENIZER_FILE},
        "caption_encoder": {"files": {"fp32": graph_file("caption_encoder", "fp32")}},
        "caption_decoder": {"files": {"fp32": graph_file("caption_decoder", "fp32")}},
    }


def decoder_tensors(decoder: LoadedDecoder) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> tensors of the two frozen tensor files."""
    projection = {k: v.detach().float().contiguous() for k, v in decoder.projection.state_dict().items()}
    return {DECODER_FILE: t5_tensors(decoder.t5), PROJECTION_FILE: projection}
