"""FedMVP's PromptFormer as tensors: its shapes and its seeded initialisation, in numpy.

The server knows the run's model before round 1 (the bundle's widths from its manifest), so it
builds the global PromptFormer itself and needs no torch for it. The computation is in
`edge_client.promptformer`. Sizes are the official code's at ViT-B (text features 512 -> 768, 4
attention heads, GEGLU feed-forward of 4x the width) scaled to the bundle: the latent width is
the image tower's width Wv, the context width the CLIP embedding width D.

Tensors (all float32):
- `proj_weight` [Wv, D], `proj_bias` [Wv]: attribute text features -> the image width;
- `query_norm_*`, `context_norm_*` [Wv]: layer norms of the patch queries and of the context;
- `attn_in_weight` [3Wv, Wv], `attn_in_bias` [3Wv]: query, key and value projections;
- `attn_out_weight` [Wv, Wv], `attn_out_bias` [Wv];
- `ff_norm_*` [Wv], `ff_in_weight` [2mWv, Wv], `ff_in_bias` [2mWv], `ff_out_weight` [Wv, mWv],
  `ff_out_bias` [Wv]: the GEGLU feed-forward (m = `ff_mult`), added to the attention output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PromptFormerShape:
    """The sizes of one PromptFormer."""

    text_dim: int  # D: CLIP text features (the bundle's embed_dim)
    width: int  # Wv: the image tower's width (patch tokens and prompt tokens)
    heads: int = 4
    ff_mult: int = 4

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"the image width {self.width} is not a multiple of {self.heads} heads")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        w, d, hidden = self.width, self.text_dim, self.ff_mult * self.width
        return {
            "proj_weight": (w, d),
            "proj_bias": (w,),
            "query_norm_weight": (w,),
            "query_norm_bias": (w,),
            "context_norm_weight": (w,),
            "context_norm_bias": (w,),
            "attn_in_weight": (3 * w, w),
            "attn_in_bias": (3 * w,),
            "attn_out_weight": (w, w),
            "attn_out_bias": (w,),
            "ff_norm_weight": (w,),
            "ff_norm_bias": (w,),
            "ff_in_weight": (2 * hidden, w),
            "ff_in_bias": (2 * hidden,),
            "ff_out_weight": (w, hidden),
            "ff_out_bias": (w,),
        }

    def parameter_count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes().values())


def initial_promptformer(shape: PromptFormerShape, seed: int) -> dict[str, np.ndarray]:
    """The run's seeded initialisation, as torch initialises the same modules: linear layers
    uniform in +-1/sqrt(fan_in) (weights and biases), the packed attention projection
    Xavier-uniform with zero biases, layer norms 1 and 0."""
    rng = np.random.default_rng([seed, 0xF3D])
    tensors: dict[str, np.ndarray] = {}
    for name, dims in shape.shapes().items():
        if name.endswith("norm_weight"):
            value = np.ones(dims)
        elif name.endswith("norm_bias") or name in ("attn_in_bias", "attn_out_bias"):
            value = np.zeros(dims)
        elif name == "attn_in_weight":
            bound = math.sqrt(6.0 / (dims[0] + dims[1]))
            value = rng.uniform(-bound, bound, dims)
        else:
            fan_in = shape.shapes()[name.replace("_bias", "_weight")][1]
            value = rng.uniform(-1.0, 1.0, dims) / math.sqrt(fan_in)
        tensors[name] = value.astype(np.float32)
    return tensors


def pooling_matrix(tokens: int, prompts: int) -> np.ndarray:
    """[P, T] adaptive average pooling of T tokens to P (as torch's AdaptiveAvgPool1d: output i
    averages tokens floor(i T / P) .. ceil((i + 1) T / P) - 1), as one matrix so that it traces to
    ONNX and batches under vmap."""
    matrix = np.zeros((prompts, tokens), np.float32)
    for i in range(prompts):
        start, end = (i * tokens) // prompts, -((-(i + 1) * tokens) // prompts)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix
