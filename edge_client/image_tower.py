"""A frozen CLIP ViT image tower in plain torch, rebuilt from a bundle's tensors, that takes visual
prompt tokens.

Visual prompt learning (VPT-shallow, MaPLe, FedMVP) back-propagates through the frozen image tower
into prompt tokens, which an onnxruntime session cannot do. This module computes what open_clip's
`VisionTransformer` computes (conv patch embedding, class token, positional embedding, ln_pre, the
residual blocks shared with the text tower but not causal, ln_post, projection of the class
token) without open_clip's code, and inserts P prompt tokens right after the class token, after
the positional embedding is added (prompts get none) and before ln_pre. With P = 0 it is
open_clip's tower. Buffers only, no data-dependent control flow: it runs under
`torch.func.vmap(grad(...))` for per-example gradients with respect to the prompts (use
`sdpa_kernel(SDPBackend.MATH)` there, as the fused kernels have no batching rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_client.residual_block import LAYER_NORM_EPS, BlockSpec, frozen_blocks

CLASS_TOKEN_POOL = "class_token"


@dataclass(frozen=True)
class ImageTowerSpec:
    """The shape of a CLIP ViT image tower, as stored in `manifest["parts"]["image_tower"]["spec"]`."""

    layers: int
    heads: int
    width: int
    mlp_width: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    output_dim: int
    act: str = "gelu"
    layer_scale: bool = False
    pool: str = CLASS_TOKEN_POOL

    def __post_init__(self) -> None:
        if self.pool != CLASS_TOKEN_POOL:
            raise ValueError(f"unknown image-tower pooling {self.pool!r}; only {CLASS_TOKEN_POOL!r}")
        if any(size % patch for size, patch in zip(self.image_size, self.patch_size, strict=True)):
            raise ValueError(
                f"image size {self.image_size} is not a multiple of patch size {self.patch_size}"
            )
        _ = self.block  # BlockSpec refuses an unknown activation or a width the heads do not divide

    @property
    def block(self) -> BlockSpec:
        return BlockSpec(self.width, self.heads, self.act, self.layer_scale, causal=False)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def tokens(self) -> int:
        """Number of patch tokens T (the class token and prompt tokens not counted)."""
        return self.grid[0] * self.grid[1]

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any]) -> ImageTowerSpec:
        values = dict(entry)
        for key in ("image_size", "patch_size"):
            values[key] = tuple(int(v) for v in values[key])
        return cls(**values)

    def to_manifest(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "heads": self.heads,
            "width": self.width,
            "mlp_width": self.mlp_width,
            "image_size": list(self.image_size),
            "patch_size": list(self.patch_size),
            "output_dim": self.output_dim,
            "act": self.act,
            "layer_scale": self.layer_scale,
            "pool": self.pool,
        }


class FrozenImageTower(nn.Module):
    """(images [N,3,H,W], prompt_tokens [N,P,Wv] or None) -> (image_features [N,D] unnormalised,
    patch_tokens [N,T,Wv]).

    Patch tokens are the ln_post-normalised outputs at the patch positions (not at the class or
    prompt positions): the width-Wv tokens that FedMVP's PromptFormer attends to. `None` and an
    empty [N,0,Wv] tensor take the same path and give bitwise equal outputs.
    """

    def __init__(self, spec: ImageTowerSpec, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        for name in ("conv1.weight", "class_embedding", "positional_embedding", "proj"):
            self.register_buffer(
                name.replace(".", "_"), tensors[name].detach().to(torch.float32).contiguous()
            )
        for norm in ("ln_pre", "ln_post"):
            for field in ("weight", "bias"):
                tensor = tensors[f"{norm}.{field}"].detach().to(torch.float32).contiguous()
                self.register_buffer(f"{norm}_{field}", tensor)
        self.blocks = frozen_blocks(spec.block, spec.layers, tensors, "image")

    def forward(
        self, images: torch.Tensor, prompt_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(self.embed(images), prompt_tokens)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1+T, Wv] input tokens (class token and patch embeddings, positional embedding added):
        frozen, so a method may compute them once per image (FedMVP's PromptFormer queries them)."""
        spec = self.spec
        if tuple(images.shape[-2:]) != spec.image_size:
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the tower takes {spec.image_size}")
        n, width = images.shape[0], spec.width
        patches = F.conv2d(images, self.conv1_weight, stride=spec.patch_size).flatten(2).transpose(1, 2)
        class_token = self.class_embedding.view(1, 1, width).expand(n, 1, width)
        return torch.cat([class_token, patches], dim=1) + self.positional_embedding

    def encode(
        self, x: torch.Tensor, prompt_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` from the input tokens of `embed`."""
        spec = self.spec
        n, width = x.shape[0], spec.width
        if prompt_tokens is None:
            prompt_tokens = x.new_zeros(n, 0, width)
        elif prompt_tokens.shape[-1] != width:
            raise ValueError(f"prompt tokens have width {prompt_tokens.shape[-1]}, the tower takes {width}")
        x = torch.cat([x[:, :1], prompt_tokens, x[:, 1:]], dim=1)
        x = F.layer_norm(x, (width,), self.ln_pre_weight, self.ln_pre_bias, LAYER_NORM_EPS)
        for block in self.blocks:
            x = block(x)
        pooled = self._ln_post(x[:, 0])
        patch_tokens = self._ln_post(x[:, -spec.tokens :])  # patches come last: [class, prompts, patches]
        return pooled @ self.proj, patch_tokens

    def _ln_post(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.spec.width,), self.ln_post_weight, self.ln_post_bias, LAYER_NORM_EPS)

    @property
    def embed_dim(self) -> int:
        return self.proj.shape[1]
