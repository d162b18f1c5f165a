"""Class text features of a CoOp context through the frozen text tower, with every exact saving.

Three ways to the same features, fastest first:

- "shared": sequences cut after the last EOT, and the prefix [SOS] ctx_1..ctx_n, identical for
  every class, run through each block once (batch 1); only the class-specific suffix runs per
  class, attending to the prefix's keys and values. Exact for a causal tower: a prefix position
  never attends to anything after it, so it has the same hidden states in every class prompt.
- "cut": every class prompt, cut after the last EOT (exact for a causal tower).
- "full": every class prompt at the full context length, as the official codes do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_client.prompts import ClassPrompts, ClassTokens
from edge_client.text_tower import LAYER_NORM_EPS, FrozenTextTower, _FrozenBlock

ENCODINGS = ("shared", "cut", "full")


class PromptTextEncoder:
    """ctx [n_ctx, W] -> text features [K, D] (not normalised), differentiable in ctx."""

    def __init__(self, tower: FrozenTextTower, tokens: ClassTokens, encoding: str = "shared") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        causal = tower.spec.causal
        self.tower = tower
        self.encoding = encoding if causal else "full"  # neither saving is exact without causality
        length = tower.context_length if self.encoding == "full" else tower.cut_length(tokens.eot_positions)
        self.prompts = ClassPrompts(tokens, tower.token_embedding, length)

    def __call__(self, ctx: torch.Tensor) -> torch.Tensor:
        if self.encoding == "shared":
            return self._shared_prefix(ctx)
        return self.tower(self.prompts.assemble(ctx), self.prompts.eot_positions)

    def _shared_prefix(self, ctx: torch.Tensor) -> torch.Tensor:
        tower, prompts = self.tower, self.prompts
        prefix = prompts.prefix(ctx)  # [1, P, W]
        length = prompts.length
        positions = tower.positional_embedding[:length]
        split = prefix.shape[1]
        prefix = prefix + positions[:split]
        suffix = prompts.suffix + positions[split:]
        for block in tower.blocks:
            keys, values = _keys_values(block, prefix)
            suffix = _suffix_block(block, suffix, keys, values)
            prefix = block(prefix)
        width = suffix.shape[2]
        rows = torch.arange(prompts.num_classes)
        pooled = suffix[rows, prompts.eot_positions - split]
        pooled = F.layer_norm(pooled, (width,), tower.ln_final_weight, tower.ln_final_bias, LAYER_NORM_EPS)
        return pooled @ tower.text_projection


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, W] -> [N, heads, L, W/heads]."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def _keys_values(block: _FrozenBlock, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix's attention keys and values in this block, [1, heads, P, W/heads] each."""
    width = prefix.shape[2]
    h = F.layer_norm(prefix, (width,), block.ln_1_weight, block.ln_1_bias, LAYER_NORM_EPS)
    weight_kv, bias_kv = block.attn_in_proj_weight[width:], block.attn_in_proj_bias[width:]
    keys, values = F.linear(h, weight_kv, bias_kv).chunk(2, dim=-1)
    return _heads(keys, block.spec.heads), _heads(values, block.spec.heads)


def _suffix_block(
    block: _FrozenBlock, suffix: torch.Tensor, prefix_keys: torch.Tensor, prefix_values: torch.Tensor
) -> torch.Tensor:
    """The block on the class-specific positions, attending causally to [prefix, suffix]."""
    classes, length, width = suffix.shape
    heads = block.spec.heads
    h = F.layer_norm(suffix, (width,), block.ln_1_weight, block.ln_1_bias, LAYER_NORM_EPS)
    q, k, v = F.linear(h, block.attn_in_proj_weight, block.attn_in_proj_bias).chunk(3, dim=-1)
    span = prefix_keys.shape[2]
    keys = torch.cat([prefix_keys.expand(classes, -1, -1, -1), _heads(k, heads)], dim=2)
    values = torch.cat([prefix_values.expand(classes, -1, -1, -1), _heads(v, heads)], dim=2)
    allowed = torch.ones(length, span + length, dtype=torch.bool).tril(diagonal=span)
    attended = F.scaled_dot_product_attention(_heads(q, heads), keys, values, attn_mask=allowed)
    attended = F.linear(attended.transpose(1, 2).reshape(classes, length, width), block.attn_out_proj_weight)
    attended = attended + block.attn_out_proj_bias
    if block.spec.layer_scale:
        attended = attended * block.ls_1_gamma
    x = suffix + attended
    h = F.layer_norm(x, (width,), block.ln_2_weight, block.ln_2_bias, LAYER_NORM_EPS)
    h = F.linear(
        block.activation(F.linear(h, block.mlp_c_fc_weight, block.mlp_c_fc_bias)), block.mlp_c_proj_weight
    )
    h = h + block.mlp_c_proj_bias
    if block.spec.layer_scale:
        h = h * block.ls_2_gamma
    return x + h
