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
from open_clip.tokenizer import default_bpe
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from edge_client.bundle import (
    DECODER_TOKENIZER_FILE,
    IMAGE_TOWER_FILE,
    MANIFEST,
    PRECISIONS,
    TEXT_TOWER_FILE,
    VOCAB_FILE,
    Bundle,
    graph_file,
    sha256_file,
)
from edge_client.bundle_signature import SIGNATURE_FILE
from edge_client.image_tower import FrozenImageTower, ImageTowerSpec
from edge_client.text_tower import FrozenTextTower
from export.caption_graphs import export_caption_graphs
from export.decoder import LoadedDecoder, decoder_tensors, load_decoder, parse_decoder, projection_spec
from export.errors import ExportError, UnsupportedModelError
from export.manifest import check_tokenizer, describe_model, image_size_of
from export.models import DEFAULT_SEED, WeightsSource, build_model, parse_weights
from export.onnx_graphs import (
    convert_to_fp16,
    export_image_encoder,
    export_prompted_image_encoder,
    export_text_encoder,
    quantize_to_int8,
)
from export.parity import measure_parity
from export.signing import load_signing_key
from export.towers import (
    ImageEncoder,
    image_tower_spec,
    image_tower_tensors,
    text_parts,
    text_tower_spec,
)

DEFAULT_OPSET = 17


def export_bundle(
    model_name: str,
    pretrained: str,
    out: Path,
    precisions: Sequence[str] = ("fp32",),
    opset: int = DEFAULT_OPSET,
    seed: int = DEFAULT_SEED,
    progress: bool = True,
    sign_key: Path | None = None,
    decoder: str | None = None,
) -> Path:
    """Write the bundle of `model_name` into `out` and return its path. fp32 graphs are always
    written; fp16 adds fp16 image, prompted image and text graphs, int8 a quantised image graph.
    With `sign_key`, manifest.sig is its Ed25519 signature of manifest.json. With `decoder` (the
    tiny captioner, a local T5 folder or a hub tag) the bundle gets the captioning capability."""
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ExportError(f"unknown precision(s) {sorted(unknown)}; choose from {list(PRECISIONS)}")
    chosen = [p for p in PRECISIONS if p == "fp32" or p in precisions]
    _check_output(out)
    signer = load_signing_key(sign_key) if sign_key is not None else None  # fail before the long part
    weights = parse_weights(pretrained)
    model = build_model(model_name, weights, seed)
    check_tokenizer(model_name)
    image_spec = image_tower_spec(model)  # refuses ViT variants before anything is written
    captioner = None
    if decoder is not None:
        embed_dim = int(text_parts(model).text_projection.shape[1])
        projection_spec(embed_dim, image_spec, 1)  # a model without patch tokens fails before loading
        captioner = load_decoder(parse_decoder(decoder), embed_dim, image_spec, seed)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _write_bundle(
            staging, model_name, model, weights, seed, image_spec, chosen, opset, progress, captioner
        )
        manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()
        (staging / MANIFEST).write_bytes(manifest_bytes)
        if signer is not None:
            (staging / SIGNATURE_FILE).write_bytes(signer.sign(manifest_bytes))
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
    image_spec: ImageTowerSpec | None,
    precisions: list[str],
    opset: int,
    progress: bool,
    decoder: LoadedDecoder | None = None,
) -> dict[str, Any]:
    """Write every file into `out` with a progress bar; return the manifest (with parity results)."""
    parts = text_parts(model)
    text_spec = text_tower_spec(parts)
    steps = [
        "towers",
        "image encoder",
        *(["prompted image encoder"] if image_spec else []),
        "text encoder",
        *[f"{p} graphs" for p in precisions[1:]],
        *(["decoder"] if decoder else []),
        "parity",
    ]
    with tqdm(total=len(steps), desc=f"export {model_name}", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("towers")
        tensors = parts.state_dict()
        save_file(tensors, str(out / TEXT_TOWER_FILE))
        shutil.copyfile(default_bpe(), out / VOCAB_FILE)
        if image_spec:
            visual = image_tower_tensors(model)
            save_file(visual, str(out / IMAGE_TOWER_FILE))
        bar.update()

        bar.set_postfix_str("image encoder")
        export_image_encoder(
            ImageEncoder(model), image_size_of(model), out / graph_file("image_encoder", "fp32"), opset
        )
        bar.update()

        if image_spec:
            bar.set_postfix_str("prompted image encoder")
            tower = FrozenImageTower(image_spec, visual)
            export_prompted_image_encoder(tower, out / graph_file("image_encoder_prompted", "fp32"), opset)
            bar.update()

        bar.set_postfix_str("text encoder")
        eot = int(open_clip.get_tokenizer(model_name).eot_token_id)
        text_tower = FrozenTextTower(text_spec, tensors, eot_token_id=eot)
        export_text_encoder(
            text_tower, model.context_length, text_spec.width, out / graph_file("text_encoder", "fp32"), opset
        )
        bar.update()

        for precision in precisions[1:]:
            bar.set_postfix_str(f"{precision} graphs")
            _write_precision(out, precision, prompted=image_spec is not None)
            bar.update()

        if decoder is not None:
            bar.set_postfix_str("decoder")
            _write_decoder(out, decoder, opset)
            bar.update()

        bar.set_postfix_str("parity")
        manifest = describe_model(model_name, model, weights, seed, opset, precisions, decoder)
        manifest["files"] = _files(out)
        manifest["versions"] = versions(decoder is not None)
        manifest["parity"] = measure_parity(model, Bundle(out, manifest))
        bar.update()
    return manifest


def versions(captioning: bool) -> dict[str, str]:
    """The versions of the libraries that made the bundle (transformers too for a decoder)."""
    modules = [torch, open_clip, onnx, onnxruntime]
    if captioning:
        import transformers

        modules.append(transformers)
    return {m.__name__: m.__version__ for m in modules}


def _write_decoder(out: Path, decoder: LoadedDecoder, opset: int) -> None:
    """The decoder's frozen tensors, its tokenizer.json and the two caption graphs."""
    from edge_client.captioner import Captioner

    for name, tensors in decoder_tensors(decoder).items():
        save_file(tensors, str(out / name))
    (out / DECODER_TOKENIZER_FILE).write_text(decoder.tokenizer_json)
    captioner = Captioner(decoder.projection, decoder.t5).eval()
    export_caption_graphs(
        captioner,
        out / graph_file("caption_encoder", "fp32"),
        out / graph_file("caption_decoder", "fp32"),
        opset,
    )


def _check_output(out: Path) -> None:
    """`out` may be missing, empty, or an earlier bundle (replaced only once the new one is complete)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ExportError(f"--out {out} is a non-empty directory that is not a bundle; choose another path")


def _write_precision(out: Path, precision: str, prompted: bool) -> None:
    graphs = ["image_encoder", "text_encoder", *(["image_encoder_prompted"] if prompted else [])]
    try:
        if precision == "fp16":
            for part in graphs:
                convert_to_fp16(out / graph_file(part, "fp32"), out / graph_file(part, "fp16"))
        else:
            quantize_to_int8(
                out / graph_file("image_encoder", "fp32"), out / graph_file("image_encoder", "int8")
            )
    except Exception as error:  # onnx/onnxruntime converters raise many types; each means "cannot convert"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UnsupportedModelError(
            f"{precision} conversion of this model's graphs failed: {reason}"
        ) from error


def _files(out: Path) -> dict[str, dict[str, Any]]:
    return {
        f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(out.iterdir())
        if f.is_file() and f.name not in (MANIFEST, SIGNATURE_FILE)
    }
