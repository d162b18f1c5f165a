"""Writes the encoder graphs: TorchScript ONNX export (fp32), fp16 conversion with float32 inputs and
outputs, and int8 dynamic quantisation of the image encoder."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch import nn

from edge_client.image_tower import FrozenImageTower
from export.errors import UnsupportedModelError
from export.quiet import quiet_root_logger

MIN_OPSET = 14  # scaled dot-product attention pieces and dynamic slicing need >= 14
EXAMPLE_BATCH = 2


def export_image_encoder(encoder: nn.Module, image_size: tuple[int, int], path: Path, opset: int) -> None:
    """images float32 [N,3,H,W] -> image_features float32 [N,D], dynamic N."""
    inputs = {"images": torch.randn(EXAMPLE_BATCH, 3, *image_size)}
    axes = {"images": {0: "batch"}, "image_features": {0: "batch"}}
    trace_to_onnx(encoder, inputs, ["image_features"], axes, path, opset, tower="image")


def export_prompted_image_encoder(tower: FrozenImageTower, path: Path, opset: int) -> None:
    """images float32 [N,3,H,W] + prompt_tokens float32 [N,P,Wv] -> image_features [N,D] and
    patch_tokens [N,T,Wv], dynamic N and P (P = 0 allowed). Exported from FrozenImageTower, whose
    attention takes the sequence length from its input (open_clip's MHA traces it as a constant)."""
    spec = tower.spec
    inputs = {
        "images": torch.randn(EXAMPLE_BATCH, 3, *spec.image_size),
        "prompt_tokens": torch.randn(EXAMPLE_BATCH, 2, spec.width),
    }
    axes = {
        "images": {0: "batch"},
        "prompt_tokens": {0: "batch", 1: "prompts"},
        "image_features": {0: "batch"},
        "patch_tokens": {0: "batch"},
    }
    trace_to_onnx(
        tower, inputs, ["image_features", "patch_tokens"], axes, path, opset, tower="prompted image"
    )


def export_text_encoder(encoder: nn.Module, context_length: int, width: int, path: Path, opset: int) -> None:
    """prompt_embeddings float32 [N,L,W] + eot_positions int64 [N] -> text_features [N,D], dynamic N, L.

    Traced at a length below the context length so that the slices of the positional embedding and
    the causal mask stay symbolic in L."""
    length = max(2, context_length // 2)
    inputs = {
        "prompt_embeddings": torch.randn(EXAMPLE_BATCH, length, width),
        "eot_positions": torch.tensor([length - 1, 1], dtype=torch.int64),
    }
    axes = {
        "prompt_embeddings": {0: "batch", 1: "length"},
        "eot_positions": {0: "batch"},
        "text_features": {0: "batch"},
    }
    trace_to_onnx(encoder, inputs, ["text_features"], axes, path, opset, tower="text")


def trace_to_onnx(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    path: Path,
    opset: int,
    tower: str,
) -> None:
    """Trace `module` on the example `inputs` (name -> tensor, in argument order) into `path`."""
    if opset < MIN_OPSET:
        raise UnsupportedModelError(f"opset {opset} is too old; fedprompt needs opset >= {MIN_OPSET}")
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX symbolic
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about python control flow are expected
            torch.onnx.export(
                module.eval(),
                tuple(inputs.values()),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(inputs),
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    except Exception as error:  # the exporter raises many types; each means "this tower does not export"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UnsupportedModelError(
            f"the {tower} tower ({type(module).__name__}) cannot be exported to ONNX opset {opset}: {reason}"
        ) from error


def convert_to_fp16(source: Path, target: Path) -> None:
    """fp16 weights and arithmetic inside, float32 inputs and outputs (onnxruntime's converter)."""
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))


# Dynamic quantisation pays off for matrix products (transformer layers, projections); onnxruntime's
# dynamic Conv quantisation fails on exported ResNets and runs slower than fp32 convolutions on CPU.
INT8_OPS = ["MatMul", "Gemm"]


def quantize_to_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the matrix products (int8 weights, activations quantised on the fly)."""
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(source))), str(prepared))
        with quiet_root_logger():
            quantize_dynamic(prepared, target, op_types_to_quantize=INT8_OPS, weight_type=QuantType.QInt8)
