"""`fedprompt export`: an open_clip model -> a bundle directory (docs/architecture.md, "Bundle format")."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from edge_client.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    PRECISIONS,
    TEXT_TOWER_FILE,
    Bundle,
    encoder_file,
    sha256_file,
)
from edge_client.text_tower import FrozenTextTower, TextTowerSpec
from export.errors import ExportError, UnsupportedModelError
from export.models import DEFAULT_SEED, WeightsSource, build_model, parse_weights
from export.onnx_graphs import convert_to_fp16, export_image_encoder, export_text_encoder, quantize_to_int8
from export.parity import measure_parity
from export.towers import ImageEncoder, TextParts, text_parts, text_tower_spec

DEFAULT_OPSET = 17


def export_bundle(
    model_name: str,
    pretrained: str,
    out: Path,
    precisions: Sequence[str] = ("fp32",),
    opset: int = DEFAULT_OPSET,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
) -> Path:
    """Write the bundle of `model_name` into `out` and return its path. fp32 graphs are always
    written; fp16 adds fp16 image and text graphs, int8 a quantised image graph."""
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ExportError(f"unknown precision(s) {sorted(unknown)}; choose from {list(PRECISIONS)}")
    chosen = [p for p in PRECISIONS if p == "fp32" or p in precisions]
    _check_output(out)
    weights = parse_weights(pretrained)
    model = build_model(model_name, weights, seed)
    _check_tokenizer(model_name)
    parts = text_parts(model)
    spec = text_tower_spec(parts)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _write_bundle(
            staging, model_name, model, weights, seed, parts, spec, chosen, opset, progress
        )
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_bundle(
    out: Path,
    model_name: str,
    model: nn.Module,
    weights: WeightsSource,
    seed: int,
    parts: TextParts,
    spec: TextTowerSpec,
    precisions: list[str],
    opset: int,
    progress: bool,
) -> dict[str, Any]:
    """Write every file into `out` with a progress bar; return the manifest (with parity results)."""
    steps = [
        "text tower",
        "image encoder",
        "text encoder",
        *[f"{p} graphs" for p in precisions[1:]],
        "parity",
    ]
    with tqdm(total=len(steps), desc=f"export {model_name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("text tower")
        tensors = parts.state_dict()
        save_file(tensors, str(out / TEXT_TOWER_FILE))
        bar.update()

        bar.set_postfix_str("image encoder")
        image_size = _image_size(model)
        export_image_encoder(ImageEncoder(model), image_size, out / encoder_file("image", "fp32"), opset)
        bar.update()

        bar.set_postfix_str("text encoder")
        tokenizer = SimpleTokenizer(context_length=model.context_length)
        tower = FrozenTextTower(spec, tensors, eot_token_id=tokenizer.eot_token_id)
        export_text_encoder(
            tower, model.context_length, spec.width, out / encoder_file("text", "fp32"), opset
        )
        bar.update()

        for precision in precisions[1:]:
            bar.set_postfix_str(f"{precision} graphs")
            _write_precision(out, precision)
            bar.update()

        bar.set_postfix_str("parity")
        embed_dim = int(tensors["text_projection"].shape[1])
        manifest = _manifest(
            model_name,
            model,
            embed_dim,
            weights,
            seed,
            spec.to_manifest(),
            image_size,
            tokenizer,
            opset,
            precisions,
            _files(out),
        )
        manifest["parity"] = measure_parity(model, Bundle(out, manifest))
        bar.update()
    return manifest


def _check_output(out: Path) -> None:
    """`out` may be missing, empty, or an earlier bundle (replaced only once the new one is complete)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"--out {out} is a non-empty directory that is not a bundle; choose another path")


def _check_tokenizer(model_name: str) -> None:
    text_cfg = (open_clip.get_model_config(model_name) or {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        raise UnsupportedModelError(
            f"{model_name} uses the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']}; only open_clip's "
            "BPE tokenizer is supported on the edge client"
        )


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _write_precision(out: Path, precision: str) -> None:
    image_fp32 = out / encoder_file("image", "fp32")
    try:
        if precision == "fp16":
            convert_to_fp16(image_fp32, out / encoder_file("image", "fp16"))
            convert_to_fp16(out / encoder_file("text", "fp32"), out / encoder_file("text", "fp16"))
        else:
            quantize_to_int8(image_fp32, out / encoder_file("image", "int8"))
    except Exception as error:  # onnx/onnxruntime converters raise many types; each means "cannot convert"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UnsupportedModelError(
            f"{precision} conversion of this model's graphs failed: {reason}"
        ) from error


def _files(out: Path) -> dict[str, dict[str, Any]]:
    return {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(out.iterdir())
        if f.is_file() and f.name != MANIFEST
    }


def _manifest(
    model_name: str,
    model: nn.Module,
    embed_dim: int,
    weights: WeightsSource,
    seed: int,
    text_tower: dict[str, Any],
    image_size: tuple[int, int],
    tokenizer: SimpleTokenizer,
    opset: int,
    precisions: list[str],
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    preprocess = open_clip.get_model_preprocess_cfg(model)
    return {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "weights": weights.manifest_entry(),
        "weights_source": {"kind": weights.kind, "value": weights.value, "sha256": weights.sha256},
        "seed": seed,
        "embed_dim": embed_dim,
        "text_width": text_tower["width"],
        "context_length": int(model.context_length),
        "vocab_size": int(model.vocab_size),
        "image_size": list(image_size),
        "preprocess": {
            "resize": image_size[0] if image_size[0] == image_size[1] else list(image_size),
            "resize_mode": preprocess.get("resize_mode", "shortest"),
            "interpolation": preprocess.get("interpolation", "bicubic"),
            "crop": image_size[0] if image_size[0] == image_size[1] else list(image_size),
            "mean": list(preprocess["mean"]),
            "std": list(preprocess["std"]),
        },
        "tokenizer": {
            "kind": "open_clip",
            "name": model_name,
            "sot_token_id": tokenizer.sot_token_id,
            "eot_token_id": tokenizer.eot_token_id,
        },
        "logit_scale": float(model.logit_scale.exp().item()),
        "text_tower": text_tower,
        "opset": opset,
        "precisions": precisions,
        "default_precision": "fp16" if "fp16" in precisions else "fp32",  # int8 (lossy) only on request
        "files": files,
        "versions": {m.__name__: m.__version__ for m in (torch, open_clip, onnx, onnxruntime)},
        "parity": {},
    }
