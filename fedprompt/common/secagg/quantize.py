"""Float updates <-> integers modulo 2**bits, with headroom so that a sum of clients never wraps.

Each coordinate is clipped to [-bound, bound] and mapped to an integer in [0, levels] with
levels = (2**bits - 1) // max_clients, so the sum of up to `max_clients` encodings is below 2**bits
and the modular sum is the true integer sum. Decoding the sum of `count` clients gives
sum_q * step - count * bound with step = 2 * bound / levels.

Error of the decoded sum against the sum of the clipped inputs, per coordinate, at most
count * (step / 2) with deterministic rounding (round to nearest) and count * step with stochastic
rounding (which is unbiased: its expectation is the clipped input), plus float64 rounding of a few
ulps of `bound` per client; `error_bound` returns exactly that. With 32 bits, 100 clients and bound
1, step is 4.7e-8.

Client-level DP noise must be added before `encode`: clipping to the bound and rounding are then
post-processing of the DP output, which keeps the guarantee (values beyond the bound are clipped,
so choose the bound a few noise standard deviations above the L2 clip norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprompt.common.secagg.modulus import Modulus

_FLOAT_SLACK_ULPS = 16.0


@dataclass(frozen=True)
class Quantizer:
    bound: float
    max_clients: int
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        if not (np.isfinite(self.bound) and self.bound > 0):
            raise ValueError(f"bound must be a positive finite number, got {self.bound}")
        if not 1 <= self.max_clients < Modulus(self.modulus_bits).value:
            raise ValueError(
                f"max_clients {self.max_clients} leaves no level per client in 2**{self.modulus_bits}"
            )

    @property
    def levels(self) -> int:
        """The largest integer one client's coordinate can encode to."""
        return (Modulus(self.modulus_bits).value - 1) // self.max_clients

    @property
    def step(self) -> float:
        return 2.0 * self.bound / self.levels

    def encode(self, vector: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """A float vector as integers in [0, levels]; stochastic rounding when `rng` is given."""
        vector = np.asarray(vector, dtype=np.float64)
        if not np.isfinite(vector).all():
            raise ValueError("cannot quantise NaN or Inf")
        scaled = (np.clip(vector, -self.bound, self.bound) + self.bound) * (self.levels / (2.0 * self.bound))
        rounded = np.rint(scaled) if rng is None else np.floor(scaled + rng.random(scaled.shape))
        return np.clip(rounded, 0, self.levels).astype(np.uint64)

    def decode(self, field_sum: np.ndarray, count: int) -> np.ndarray:
        """The float sum of `count` clients' clipped inputs from the modular sum of their encodings."""
        if not 1 <= count <= self.max_clients:
            raise ValueError(f"a sum of {count} clients is outside [1, max_clients={self.max_clients}]")
        return np.asarray(field_sum, dtype=np.uint64).astype(np.float64) * self.step - count * self.bound

    def error_bound(self, count: int, stochastic: bool) -> float:
        """Largest |decode(sum) - sum of clipped inputs| per coordinate for a sum of `count` clients."""
        rounding = self.step if stochastic else self.step / 2.0
        return count * (rounding + _FLOAT_SLACK_ULPS * self.bound * np.finfo(np.float64).eps)
