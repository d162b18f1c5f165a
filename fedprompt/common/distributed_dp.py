"""The distributed Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021) on one device's update.

Each device clips its update to `clip` in L2, multiplies by `scale` (integers per unit), rounds
randomly to integers and adds integer Skellam noise Sk(lam); secure aggregation then adds the
devices' vectors modulo 2**modulus_bits and the aggregator sees only the sum. Sums of independent
Skellams are Skellam, so `count` survivors give central noise Sk(count * lam), variance
2 * count * lam, exactly. Each device sizes lam for the *threshold* number of survivors, the
fewest the secure-aggregation round accepts, so the central variance is at least the target
(noise_multiplier * clip * scale)**2 whatever dropouts the round survives.

Rounding is the Skellam/DDG papers' conditional randomised rounding: round each coordinate up
with probability equal to its fractional part, and redraw until the rounded vector's squared L2
norm is at most `l2_bound_sq`, the integer below the papers' bound (DDG Theorem 1 / Skellam
Lemma, with beta = exp(-1/2)): min((sC + sqrt(d))**2, (sC)**2 + d/4 + sqrt(2 ln(1/beta))
(sC + sqrt(d)/2)). Because the bound is enforced, it is the exact L2 sensitivity of one
device's integer vector, and the L1 sensitivity is min(l2_bound_sq, sqrt(d * l2_bound_sq))
(integer entries: |x| <= x**2).

No random rotation: with up to 53-bit moduli, the deterministic bound |coordinate| <= sqrt of
`l2_bound_sq` per device leaves room, so wrap-around needs only the noise to stay small, and
`wrap_probability` bounds that (Chernoff bound of the Skellam tail, union over coordinates).
The configuration refuses itself when the bound exceeds `max_wrap_probability`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedprompt.common.privacy import clip_to_norm, secure_rng
from fedprompt.common.secagg.modulus import Modulus
from fedprompt.common.skellam_sampler import BitSource, SkellamSampler

ROUNDING_BETA = math.exp(-0.5)  # the papers' default
DEFAULT_MAX_WRAP = 1e-9
DEFAULT_ROUNDING_INFLATION = 0.01


class DistributedConfigError(ValueError):
    """The distributed-DP settings are unusable (wrap-around too likely, no room for the sum)."""


def rounded_l2_bound(scaled_clip: float, dim: int, beta: float = ROUNDING_BETA) -> float:
    """The papers' high-probability L2 bound of a randomly rounded vector of norm <= scaled_clip."""
    loose = scaled_clip + math.sqrt(dim)
    slack = math.sqrt(2 * math.log(1 / beta)) * (scaled_clip + math.sqrt(dim) / 2)
    tight_sq = scaled_clip**2 + dim / 4 + slack
    return min(loose, math.sqrt(tight_sq))


def skellam_tail(threshold: int, poisson_mean: float) -> float:
    """Chernoff bound on P(|Z| >= threshold) for Z = P1 - P2, P_i ~ Poisson(poisson_mean):
    E e^{tZ} = exp(2 m (cosh t - 1)), optimised at t = asinh(a / 2m)."""
    if threshold <= 0:
        return 1.0
    a, m = float(threshold), float(poisson_mean)
    log_tail = 2 * m * (math.sqrt(1 + (a / (2 * m)) ** 2) - 1) - a * math.asinh(a / (2 * m))
    return min(1.0, 2 * math.exp(log_tail))


def default_scale(clip: float, dim: int, inflation: float = DEFAULT_ROUNDING_INFLATION) -> float:
    """The smallest power of two s for which rounding inflates the L2 sensitivity by at most
    `inflation` (a power of two makes `x * s` and `/ s` exact in floating point)."""
    scale = 2.0 ** math.floor(math.log2(1.0 / clip))
    while rounded_l2_bound(scale * clip, dim) > (1 + inflation) * scale * clip:
        scale *= 2
    return scale


@dataclass(frozen=True)
class SkellamConfig:
    """One run's distributed Skellam settings; every derived quantity the accountant needs."""

    clip: float
    noise_multiplier: float  # central noise std = noise_multiplier * clip, at `threshold` survivors
    threshold: int  # the fewest survivors a round accepts (the secure-aggregation threshold)
    max_clients: int  # the most devices whose vectors are summed
    dim: int
    scale: float
    modulus_bits: int = 32
    max_wrap_probability: float = DEFAULT_MAX_WRAP

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.noise_multiplier > 0 and self.scale > 0 and self.dim >= 1):
            raise DistributedConfigError("clip, noise_multiplier, scale and dim must be positive")
        if not 1 <= self.threshold <= self.max_clients:
            raise DistributedConfigError(f"threshold {self.threshold} outside [1, {self.max_clients}]")
        Modulus(self.modulus_bits)
        if self.wrap_probability > self.max_wrap_probability:
            raise DistributedConfigError(
                f"wrap-around probability per round <= {self.wrap_probability:.3g} exceeds "
                f"{self.max_wrap_probability:g}: raise modulus_bits or lower scale ({self.summary()})"
            )

    @property
    def l2_bound_sq(self) -> int:
        """Exact bound on one device's rounded vector's squared L2 norm (enforced by rounding)."""
        return math.floor(rounded_l2_bound(self.scale * self.clip, self.dim) ** 2)

    @property
    def l1_bound(self) -> float:
        return min(float(self.l2_bound_sq), math.sqrt(self.dim * self.l2_bound_sq))

    @property
    def device_lambda(self) -> int:
        """Each device's Poisson mean: its Sk(lam) share, sized so `threshold` of them reach the
        target central variance (rounded up: more noise, never less)."""
        target_variance = (self.noise_multiplier * self.clip * self.scale) ** 2
        return max(1, math.ceil(target_variance / (2 * self.threshold)))

    def central_variance(self, survivors: int) -> int:
        """Per-coordinate variance of the noise in a sum of `survivors` devices (integer units)."""
        return 2 * self.device_lambda * survivors

    @property
    def wrap_probability(self) -> float:
        """Bound on P(some coordinate of a round's sum leaves [-2**(bits-1), 2**(bits-1))):
        signal at most max_clients * sqrt(l2_bound_sq) per coordinate, noise Sk(max_clients*lam)."""
        signal = self.max_clients * math.isqrt(self.l2_bound_sq)
        room = (1 << (self.modulus_bits - 1)) - signal
        return min(1.0, self.dim * skellam_tail(room, self.max_clients * self.device_lambda))

    def summary(self) -> str:
        """The line printed at configuration time."""
        central_std = math.sqrt(self.central_variance(self.threshold)) / self.scale
        return (
            f"distributed Skellam DP: clip {self.clip:g}, scale {self.scale:g}, "
            f"device Sk({self.device_lambda}) (central std {central_std:.4g} at the threshold "
            f"of {self.threshold} survivors, target {self.noise_multiplier * self.clip:.4g}), "
            f"{self.modulus_bits}-bit sums of up to {self.max_clients}: wrap-around probability per round "
            f"<= {max(self.wrap_probability, 1e-300):.2g}"
        )

    def sampler(self, source: BitSource | None = None) -> SkellamSampler:
        return SkellamSampler(self.device_lambda, source)

    def check_session(self, threshold: int, modulus_bits: int, vector_length: int) -> None:
        """Refuse a secure-aggregation session that could recover a sum with less noise than
        accounted (a threshold below this one's) or that does not carry these integers. fedprompt's
        SecAgg has every signer check `threshold` other uploaders, so a recovered sum holds at
        least threshold + 1 inputs: requiring threshold >= this one's is conservative by one."""
        if threshold < self.threshold:
            raise DistributedConfigError(
                f"the session's threshold {threshold} is below the {self.threshold} survivors the noise "
                "is sized for: a sum of fewer devices would carry less noise than accounted"
            )
        if modulus_bits != self.modulus_bits or vector_length != self.dim:
            raise DistributedConfigError(
                f"the session sums {vector_length} values modulo 2**{modulus_bits}, "
                f"the noise is configured for {self.dim} modulo 2**{self.modulus_bits}"
            )


def conditional_round(scaled: np.ndarray, l2_bound_sq: int, rng: np.random.Generator) -> np.ndarray:
    """Unbiased randomised rounding to int64, redrawn until the squared norm is <= l2_bound_sq."""
    floor = np.floor(scaled)
    fraction = scaled - floor
    for _ in range(1000):
        rounded = (floor + (rng.random(scaled.shape) < fraction)).astype(np.int64)
        if int(np.dot(rounded, rounded)) <= l2_bound_sq:
            return rounded
    raise RuntimeError("conditional rounding kept exceeding the L2 bound: the bound does not fit the input")


def privatize(
    update: np.ndarray,
    config: SkellamConfig,
    sampler: SkellamSampler,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """One device's DP output: clip, scale, conditionally round, add its Sk(lam) share (int64)."""
    vector = np.asarray(update, dtype=np.float64).reshape(-1)
    if vector.shape != (config.dim,):
        raise ValueError(f"expected {config.dim} coordinates, got {vector.size}")
    if sampler.poisson.lam != config.device_lambda:
        raise ValueError("the sampler's mean is not the configuration's device share")
    clipped = clip_to_norm({"update": vector}, config.clip)[0]["update"]
    rounded = conditional_round(clipped * config.scale, config.l2_bound_sq, rng or secure_rng())
    return rounded + sampler.samples(config.dim)


def masked_input(
    update: np.ndarray,
    config: SkellamConfig,
    sampler: SkellamSampler,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The device's input to secure aggregation: its DP output in Z_{2**bits}, noise already in
    (integer noise added in the integer domain, before any masking)."""
    return to_ring(privatize(update, config, sampler, rng), config.modulus_bits)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers as elements of Z_{2**bits} (two's complement's low bits)."""
    return np.asarray(values, dtype=np.int64).astype(np.uint64) & np.uint64((1 << bits) - 1)


def from_ring(field_sum: np.ndarray, bits: int) -> np.ndarray:
    """The centred lift of a modular sum back to signed integers in [-2**(bits-1), 2**(bits-1))."""
    values = np.asarray(field_sum, dtype=np.uint64).astype(np.int64)
    return np.where(values >= (1 << (bits - 1)), values - (1 << bits), values)


def decode_sum(field_sum: np.ndarray, config: SkellamConfig) -> np.ndarray:
    """The float noisy sum of clipped updates from the modular sum of the devices' vectors."""
    return from_ring(field_sum, config.modulus_bits).astype(np.float64) / config.scale
