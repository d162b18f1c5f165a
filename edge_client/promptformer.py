"""FedMVP's PromptFormer, applied functionally to its tensors (`fedprompt.common.promptformer`):
(attribute text features, an image's patch embeddings) -> P visual prompt tokens.

As the official code builds it: the normalised text features of the attribute sentences are
projected to the image width; the image's patch embeddings (the frozen tower's input tokens,
positional embedding added) are the queries of a multi-head cross-attention whose keys and values
are the projected text features (each side layer-normed first); a GEGLU feed-forward is added to
the attention output; adaptive average pooling over the patch positions gives P prompt tokens.

What does not depend on the image (the projected, normed context and its keys and values) is
`context`, computed once per batch; `prompts` is per image. Plain tensor ops only: it runs under
vmap(grad) for per-example gradients and traces to ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edge_client.residual_block import LAYER_NORM_EPS
from edge_client.training import Params

Context = tuple[torch.Tensor, torch.Tensor]  # keys, values [M, Wv]


def _norm(x: torch.Tensor, params: Params, name: str, width: int) -> torch.Tensor:
    """Layer norm over the last dimension; `width` is a Python int so that it traces as a constant."""
    return F.layer_norm(x, (width,), params[f"{name}_weight"], params[f"{name}_bias"], LAYER_NORM_EPS)


def context(params: Params, text_features: torch.Tensor, width: int) -> Context:
    """Keys and values [M, Wv] of the M attribute text features [M, D]."""
    projected = text_features @ params["proj_weight"].T + params["proj_bias"]
    normed = _norm(projected, params, "context_norm", width)
    _, w_k, w_v = params["attn_in_weight"].chunk(3)
    _, b_k, b_v = params["attn_in_bias"].chunk(3)
    return normed @ w_k.T + b_k, normed @ w_v.T + b_v


def prompts(
    params: Params, keys_values: Context, patches: torch.Tensor, heads: int, pooling: torch.Tensor, width: int
) -> torch.Tensor:
    """Prompt tokens [B, P, Wv] of patch embeddings [B, T, Wv]; `pooling` is the [P, T] matrix of
    `fedprompt.common.promptformer.pooling_matrix`."""
    keys, values = keys_values
    w_q, b_q = params["attn_in_weight"].chunk(3)[0], params["attn_in_bias"].chunk(3)[0]
    queries = _norm(patches, params, "query_norm", width) @ w_q.T + b_q
    head = width // heads
    q = queries.unflatten(-1, (heads, head)).transpose(1, 2)  # [B, H, T, d]
    k = keys.view(-1, heads, head).transpose(0, 1)  # [H, M, d]
    v = values.view(-1, heads, head).transpose(0, 1)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head), dim=-1)  # [B, H, T, M]
    attended = (weights @ v).transpose(1, 2).flatten(-2)
    x = attended @ params["attn_out_weight"].T + params["attn_out_bias"]
    hidden = _norm(x, params, "ff_norm", width) @ params["ff_in_weight"].T + params["ff_in_bias"]
    value, gate = hidden.chunk(2, dim=-1)
    x = x + (value * F.gelu(gate)) @ params["ff_out_weight"].T + params["ff_out_bias"]
    return pooling @ x  # [P, T] @ [B, T, Wv] -> [B, P, Wv]
