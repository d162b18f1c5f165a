"""DP-FPL's factorisation of a local prompt M [n_ctx, W] as u @ v + residual, redone every step.

One power iteration warm-started from the previous right factor, then orthonormalisation:
u = orth(M @ v_prev.T) [n_ctx, r], v = u.T @ M [r, W], residual = M - u @ v. Then u @ v = u u.T M
is M projected on the span of u, and repeated calls (one per training step, M changing slowly) are
subspace iteration: they converge to the best rank-r approximation (Eckart-Young). The
orthonormalisation is a QR decomposition, the numerically stable form of Gram-Schmidt (same span).
The residual is a constant for the step (detached): gradients reach the prompt through u and v only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankFactors:
    u: torch.Tensor  # [n_ctx, r], orthonormal columns
    v: torch.Tensor  # [r, W]
    residual: torch.Tensor  # [n_ctx, W], carries what the rank-r part does not

    def matrix(self) -> torch.Tensor:
        return self.u @ self.v + self.residual


def factorise(
    matrix: torch.Tensor, rank: int, warm_v: torch.Tensor | None, generator: torch.Generator | None = None
) -> LowRankFactors:
    """One warm-started power iteration on `matrix` (a random start when there is no previous v)."""
    rows, width = matrix.shape
    if not 1 <= rank <= rows:
        raise ValueError(f"rank must be in 1..{rows} for a [{rows}, {width}] prompt, got {rank}")
    with torch.no_grad():
        start = warm_v.T if warm_v is not None else torch.randn(width, rank, generator=generator)
        u, _ = torch.linalg.qr(matrix @ start.to(matrix.dtype))
        v = u.T @ matrix
        return LowRankFactors(u, v, matrix - u @ v)
