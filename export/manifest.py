"""Every manifest field that follows from the open_clip model: what `export` writes and what `verify`
recomputes from the model it rebuilds, so that an edited field (a preprocessing mean, the logit
scale, a dimension, a part) cannot pass verification with its file hashes left consistent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import open_clip
from torch import nn

from edge_client.bundle import (
    FORMAT_VERSION,
    IMAGE_TOWER_FILE,
    TEXT_TOWER_FILE,
    VOCAB_FILE,
    capabilities_of,
    graph_file,
)
from edge_client.image_tower import ImageTowerSpec
from edge_client.text_tower import TextTowerSpec
from export.decoder import LoadedDecoder, decoder_parts
from export.errors import UnsupportedModelError
from export.models import WeightsSource
from export.towers import image_tower_spec, text_parts, text_tower_spec

TEXT_GRAPH_PRECISIONS = ("fp32", "fp16")  # int8 quantises the plain image encoder only


def describe_model(
    model_name: str,
    model: nn.Module,
    weights: WeightsSource,
    seed: int,
    opset: int,
    precisions: Sequence[str],
    decoder: LoadedDecoder | None = None,
) -> dict[str, Any]:
    """The manifest without `files`, `versions` and `parity`, in the order the manifest lists them.
    With `decoder`, the parts of the captioning capability are added."""
    check_tokenizer(model_name)
    text = text_parts(model)
    text_spec = text_tower_spec(text)
    image_spec = image_tower_spec(model)
    image_size = image_size_of(model)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    tokenizer = open_clip.get_tokenizer(model_name)
    square = image_size[0] == image_size[1]
    parts = bundle_parts(precisions, text_spec, image_spec)
    if decoder is not None:
        parts.update(decoder_parts(decoder))
    return {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "weights": weights.manifest_entry(),
        "weights_source": {"kind": weights.kind, "value": weights.value, "sha256": weights.sha256},
        "seed": seed,
        "embed_dim": int(text.text_projection.shape[1]),
        "text_width": text_spec.width,
        "context_length": int(model.context_length),
        "vocab_size": int(model.vocab_size),
        "image_size": list(image_size),
        "image_width": image_spec.width if image_spec else None,
        "image_tokens": image_spec.tokens if image_spec else None,
        "preprocess": {
            "resize": image_size[0] if square else list(image_size),
            "resize_mode": preprocess.get("resize_mode", "shortest"),
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "crop": image_size[0] if square else list(image_size),
            "mean": [float(v) for v in preprocess["mean"]],
            "std": [float(v) for v in preprocess["std"]],
        },
        "tokenizer": {
            "kind": "open_clip",
            "name": model_name,
            "sot_token_id": int(tokenizer.sot_token_id),
            "eot_token_id": int(tokenizer.eot_token_id),
            "vocab": VOCAB_FILE,
        },
        "logit_scale": float(model.logit_scale.exp().item()),
        "text_tower": text_spec.to_manifest(),
        "capabilities": capabilities_of(parts),
        "parts": parts,
        "opset": opset,
        "precisions": list(precisions),
        "default_precision": "fp16" if "fp16" in precisions else "fp32",  # int8 (lossy) only on request
    }


def check_tokenizer(model_name: str) -> None:
    """Only open_clip's BPE tokenizer with its default settings is implemented on the device."""
    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        raise UnsupportedModelError(
            f"{model_name} uses the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']}; only open_clip's "
            "BPE tokenizer is supported on the edge client"
        )
    if text_cfg.get("tokenizer_kwargs"):
        raise UnsupportedModelError(
            f"{model_name}'s tokenizer settings {text_cfg['tokenizer_kwargs']} are not supported on the edge "
            "client (only open_clip's BPE tokenizer with its default 'lower' cleaning)"
        )


def bundle_parts(
    precisions: Sequence[str], text_spec: TextTowerSpec, image_spec: ImageTowerSpec | None
) -> dict[str, dict[str, Any]]:
    """The manifest's `parts`: each part's files (per precision for graphs) and spec."""
    text_precisions = [p for p in precisions if p in TEXT_GRAPH_PRECISIONS]
    parts: dict[str, dict[str, Any]] = {
        "image_encoder": {"files": {p: graph_file("image_encoder", p) for p in precisions}},
        "text_encoder": {"files": {p: graph_file("text_encoder", p) for p in text_precisions}},
        "text_tower": {"file": TEXT_TOWER_FILE, "spec": text_spec.to_manifest()},
    }
    if image_spec is not None:
        parts["image_tower"] = {"file": IMAGE_TOWER_FILE, "spec": image_spec.to_manifest()}
        parts["image_encoder_prompted"] = {
            "files": {p: graph_file("image_encoder_prompted", p) for p in text_precisions}
        }
    return parts


def image_size_of(model: nn.Module) -> tuple[int, int]:
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
