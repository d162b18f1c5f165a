"""Class text features of a CoOp context through the frozen text tower, with every exact saving.

Three ways to the same features, fastest first:

- "shared": sequences cut after the last EOT, and the prefix [SOS] ctx_1..ctx_n, identical for
  every class, run through each block once (batch 1); only the class-specific suffix runs per
  class, attending to the prefix's keys and values. Exact for a causal tower: a prefix position
  never attends to anything after it, so it has the same hidden states in every class prompt.
  The last block computes only each class's EOT row, the only one pooled.
- "cut": every class prompt, cut after the last EOT (exact for a causal tower).
- "full": every class prompt at the full context length, as the official codes do.

A context per class ([K, n_ctx, W]) has no prefix shared by the classes: under "shared" it runs cut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_client.prompts import ClassPrompts, ClassTokens
from edge_client.residual_block import LAYER_NORM_EPS, FrozenResidualBlock
from edge_client.text_tower import FrozenTextTower

ENCODINGS = ("shared", "cut", "full")


class PromptTextEncoder:
    """ctx [n_ctx, W] (or one per class, [K, n_ctx, W]) -> text features [K, D] (not normalised),
    differentiable in ctx."""

    def __init__(self, tower: FrozenTextTower, tokens: ClassTokens, encoding: str = "shared") -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        causal = tower.spec.causal
        self.tower = tower
        self.encoding = encoding if causal else "full"  # neither saving is exact without causality
        length = tower.context_length if self.encoding == "full" else tower.cut_length(tokens.eot_positions)
        self.prompts = ClassPrompts(tokens, tower.token_embedding, length)

    def __call__(self, ctx: torch.Tensor) -> torch.Tensor:
        if self.encoding == "shared" and ctx.dim() == 2:
            return self._shared_prefix(ctx)
        return self.tower(self.prompts.assemble(ctx), self.prompts.eot_positions)

    def _shared_prefix(self, ctx: torch.Tensor) -> torch.Tensor:
        tower, prompts = self.tower, self.prompts
        prefix = prompts.prefix(ctx)  # [1, P, W]
        split = prefix.shape[1]
        positions = tower.positional_embedding[: prompts.length]
        prefix = prefix + positions[:split]
        suffix = prompts.suffix + positions[split:]
        eot_rows = prompts.eot_positions - split
        last = len(tower.blocks) - 1
        for index, block in enumerate(tower.blocks):
            keys, values = _keys_values(block, _norm_1(block, prefix))
            # the last block only needs each class's EOT row, and no prefix output at all
            suffix = _suffix_block(block, suffix, keys, values, eot_rows if index == last else None)
            if index < last:
                prefix = block(prefix)
        pooled = suffix[:, 0]
        width = pooled.shape[1]
        pooled = F.layer_norm(pooled, (width,), tower.ln_final_weight, tower.ln_final_bias, LAYER_NORM_EPS)
        return pooled @ tower.text_projection


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, W] -> [N, heads, L, W/heads]."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def _norm_1(block: FrozenResidualBlock, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), block.ln_1_weight, block.ln_1_bias, LAYER_NORM_EPS)


def _keys_values(block: FrozenResidualBlock, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention keys and values [N, heads, L, W/heads] of layer-normed inputs [N, L, W]."""
    width = normed.shape[2]
    weight_kv, bias_kv = block.attn_in_proj_weight[width:], block.attn_in_proj_bias[width:]
    keys, values = F.linear(normed, weight_kv, bias_kv).chunk(2, dim=-1)
    return _heads(keys, block.spec.heads), _heads(values, block.spec.heads)


def _suffix_block(
    block: FrozenResidualBlock,
    suffix: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    rows: torch.Tensor | None,
) -> torch.Tensor:
    """The block on the class-specific positions [K, S, W], attending causally to [prefix, suffix].
    With `rows` [K], only that row of each class is computed (output [K, 1, W])."""
    classes, length, width = suffix.shape
    heads, span = block.spec.heads, prefix_keys.shape[2]
    normed = _norm_1(block, suffix)
    suffix_keys, suffix_values = _keys_values(block, normed)
    keys = torch.cat([prefix_keys.expand(classes, -1, -1, -1), suffix_keys], dim=2)
    values = torch.cat([prefix_values.expand(classes, -1, -1, -1), suffix_values], dim=2)
    allowed = torch.ones(length, span + length, dtype=torch.bool).tril(diagonal=span)
    if rows is not None:
        pick = torch.arange(classes)
        normed, suffix, allowed = (
            normed[pick, rows, None],
            suffix[pick, rows, None],
            allowed[rows, None, None],
        )
    queries = F.linear(normed, block.attn_in_proj_weight[:width], block.attn_in_proj_bias[:width])
    attended = F.scaled_dot_product_attention(_heads(queries, heads), keys, values, attn_mask=allowed)
    return block.after_attention(suffix, attended.transpose(1, 2).reshape(classes, -1, width))
