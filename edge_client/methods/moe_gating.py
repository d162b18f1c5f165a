"""pFedMoAP's mixture of prompt experts: the local attention gating network and the logits it gives.

For each class, the experts are the class's text features under K prompts: the local prompt's and
those of the K-1 downloaded (non-local) prompts, each normalised and then subsampled to the gating
width. The gating network is multi-head attention with the subsampled image feature as query and
the class's experts as keys and values (four Linear(d, d): query, key, value, output projections;
scores scaled by `gating_scaling` = 10 instead of 1/sqrt(d_head), as in pFedMoAP's code), giving
one mixed text feature per (image, class). Logits:

    lambda * s * (I . T_local)  +  s * (sub(I) . T_mixed)

with I the normalised image feature, s the logit scale, lambda `mixture_lambda` (0.5).

Subsampling: pFedMoAP keeps every (D // d_gating)-th coordinate of the D-dim features (D=512,
d=128: every 4th). For D < d_gating (small test models) the stride is 1 and the gating runs at width
D; the width is cut to a multiple of the number of heads so the heads split it evenly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edge_client.training import TextEncoder, normalise
from fedprompt.common.settings import SettingsError


class FeatureSubsampler:
    """D-dim features -> gating width by stride subsampling."""

    def __init__(self, embed_dim: int, gating_dim: int, heads: int) -> None:
        self.stride = max(1, embed_dim // gating_dim)
        available = len(range(0, embed_dim, self.stride))
        self.width = min(gating_dim, available) // heads * heads
        if self.width == 0:
            raise SettingsError(f"{embed_dim}-dim features leave no gating width for {heads} heads")

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features[..., :: self.stride][..., : self.width]


class AttentionGating(nn.Module):
    """Multi-head attention over a class's experts, queried by an image feature."""

    def __init__(self, width: int, heads: int, scaling: float) -> None:
        super().__init__()
        self.heads = heads
        self.scaling = scaling
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, queries: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """queries [B, d], experts [C, E, d] -> mixed features [C, B, d]."""
        batch, width = queries.shape
        classes, count, _ = experts.shape
        head = width // self.heads
        q = self.query(queries).view(batch, self.heads, head).transpose(0, 1)  # [h, B, d_h]
        k = self.key(experts).view(classes, count, self.heads, head).transpose(1, 2)  # [C, h, E, d_h]
        v = self.value(experts).view(classes, count, self.heads, head).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q.expand(classes, -1, -1, -1), k, v, scale=self.scaling)
        return self.out(attended.transpose(1, 2).reshape(classes, batch, width))


def expert_features(encode: TextEncoder, prompts: torch.Tensor, subsample: FeatureSubsampler) -> torch.Tensor:
    """[E, C, d]: the non-local experts, computed once per round without gradients (they are fixed)."""
    with torch.no_grad():
        return torch.stack([subsample(normalise(encode(prompt))) for prompt in prompts])


def mixture_logits(
    images: torch.Tensor,
    local_text: torch.Tensor,
    experts: torch.Tensor | None,
    gating: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    subsample: FeatureSubsampler,
    logit_scale: float,
    mixture_lambda: float,
) -> torch.Tensor:
    """[B, C] logits of normalised images [B, D] given the local prompt's raw text features [C, D]
    and the non-local experts [E, C, d] (`gating` maps them as AttentionGating does). Without
    experts (a client's first round) they are the local prompt's plain CLIP logits, as in pFedMoAP."""
    local = normalise(local_text)
    local_logits = logit_scale * images @ local.T
    if experts is None:
        return local_logits
    queries = subsample(images)
    keys = torch.cat([subsample(local)[None], experts]).transpose(0, 1)  # [C, 1 + E, d]
    mixed = gating(queries, keys)  # [C, B, d]
    return mixture_lambda * local_logits + logit_scale * torch.einsum("bd,cbd->bc", queries, mixed)
