"""The one residual attention block of both frozen CLIP towers (text and image), in plain torch.

open_clip's `ResidualAttentionBlock` (pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x)), optional
layer scale) is rebuilt here from its state-dict tensors, so a device runs either tower without
open_clip's model code. Tensors are buffers, never parameters: optimisers and opacus must not see
them, and gradients reach only the inputs. The attention is `scaled_dot_product_attention`,
causal for the text tower and not for the image tower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5
ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass(frozen=True)
class BlockSpec:
    """What a block needs to know beyond its tensors."""

    width: int
    heads: int
    act: str = "gelu"
    layer_scale: bool = False
    causal: bool = True

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.act!r}; expected one of {ACTIVATIONS}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class FrozenResidualBlock(nn.Module):
    """[N,L,W] -> [N,L,W]: one pre-LN transformer block with open_clip's tensor names
    (ln_1.*, attn.in_proj_*, attn.out_proj.*, ln_2.*, mlp.c_fc.*, mlp.c_proj.*, ls_1/2.gamma)."""

    def __init__(self, spec: BlockSpec, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        for name, tensor in tensors.items():
            self.register_buffer(name.replace(".", "_"), tensor.detach().to(torch.float32).contiguous())
        self.activation = F.gelu if spec.act == "gelu" else _quick_gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        width, heads = self.spec.width, self.spec.heads  # python ints keep the ONNX graph's shapes static
        h = F.layer_norm(x, (width,), self.ln_1_weight, self.ln_1_bias, LAYER_NORM_EPS)
        qkv = F.linear(h, self.attn_in_proj_weight, self.attn_in_proj_bias)
        q, k, v = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.spec.causal)
        return self.after_attention(x, attended.transpose(1, 2).reshape(n, length, width))

    def after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the block once attention has run ([N,L,W] with heads merged): output
        projection and MLP, each with its residual. Shared with the prompt encoder's partial blocks."""
        width = self.spec.width
        attended = F.linear(attended, self.attn_out_proj_weight, self.attn_out_proj_bias)
        if self.spec.layer_scale:
            attended = attended * self.ls_1_gamma
        x = x + attended
        h = F.layer_norm(x, (width,), self.ln_2_weight, self.ln_2_bias, LAYER_NORM_EPS)
        h = F.linear(
            self.activation(F.linear(h, self.mlp_c_fc_weight, self.mlp_c_fc_bias)), self.mlp_c_proj_weight
        )
        h = h + self.mlp_c_proj_bias
        if self.spec.layer_scale:
            h = h * self.ls_2_gamma
        return x + h


def frozen_blocks(
    spec: BlockSpec, layers: int, tensors: Mapping[str, torch.Tensor], tower: str
) -> nn.ModuleList:
    """The `layers` blocks stored as transformer.resblocks.{i}.* in a tower's tensors."""
    return nn.ModuleList(
        FrozenResidualBlock(spec, _block_tensors(tensors, f"transformer.resblocks.{i}.", tower))
        for i in range(layers)
    )


def _block_tensors(tensors: Mapping[str, torch.Tensor], prefix: str, tower: str) -> dict[str, torch.Tensor]:
    """The tensors of one block, named relative to the block (e.g. 'attn.in_proj_weight')."""
    block = {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
    if not block:
        raise KeyError(f"no tensors named {prefix}* in the {tower} tower")
    return block
