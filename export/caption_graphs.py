"""The captioner's ONNX graphs: caption_encoder.onnx (projection + T5 encoder, with soft prompts)
and caption_decoder.onnx (one decoding step with self-attention past keys/values)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edge_client.caption_onnx import ENCODER_INPUTS, ENCODER_OUTPUT, past_names
from edge_client.captioner import Captioner, DecoderStep
from export.onnx_graphs import EXAMPLE_BATCH, trace_to_onnx

EXAMPLE_PROMPTS = 2  # traced with P = 2 prompt tokens; P is dynamic (0 allowed)
EXAMPLE_PAST = 3  # traced with a past of 3 tokens; the past length is dynamic (0 at the first step)


class EncoderGraph(nn.Module):
    """(prompt_embeds [N,P,d], image_features [N,D], patch_tokens [N,T,Wv]) -> encoder_states [N,P+1+T,d]."""

    def __init__(self, captioner: Captioner) -> None:
        super().__init__()
        self.captioner = captioner

    def forward(self, prompt: torch.Tensor, features: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.captioner.encoder_states(prompt, features, patches)


def export_caption_graphs(captioner: Captioner, encoder_path: Path, decoder_path: Path, opset: int) -> None:
    spec = captioner.projection.spec
    config = captioner.t5.config
    n = EXAMPLE_BATCH
    inputs = {
        "prompt_embeds": torch.randn(n, EXAMPLE_PROMPTS, spec.d_model),
        "image_features": torch.randn(n, spec.image_dim),
        "patch_tokens": torch.randn(n, spec.patch_tokens, spec.patch_width),
    }
    assert tuple(inputs) == ENCODER_INPUTS
    axes = {name: {0: "batch"} for name in inputs}
    axes["prompt_embeds"][1] = "prompts"
    axes[ENCODER_OUTPUT] = {0: "batch", 1: "length"}
    trace_to_onnx(
        EncoderGraph(captioner), inputs, [ENCODER_OUTPUT], axes, encoder_path, opset, "caption encoder"
    )

    layers = int(config.num_decoder_layers)
    past = {name: torch.randn(n, config.num_heads, EXAMPLE_PAST, config.d_kv) for name in past_names(layers)}
    step_inputs = {
        "input_ids": torch.randint(0, config.vocab_size, (n, 1)),
        ENCODER_OUTPUT: torch.randn(n, spec.patch_tokens + 1 + EXAMPLE_PROMPTS, spec.d_model),
        **past,
    }
    presents = past_names(layers, "present")
    step_axes = {"input_ids": {0: "batch"}, ENCODER_OUTPUT: {0: "batch", 1: "length"}, "logits": {0: "batch"}}
    step_axes.update({name: {0: "batch", 2: "past"} for name in past})
    step_axes.update({name: {0: "batch", 2: "past_plus_one"} for name in presents})
    trace_to_onnx(
        DecoderStep(captioner.t5),
        step_inputs,
        ["logits", *presents],
        step_axes,
        decoder_path,
        opset,
        "decoder",
    )
