"""Exact Poisson and Skellam sampling in integer arithmetic from the OS's cryptographic randomness.

Distributed DP (fedprompt.common.distributed_dp) adds Skellam noise Sk(lam) = P1 - P2 with
P1, P2 ~ Poisson(lam) independent; floating-point samplers (numpy's Poisson, inversion of a float
cdf) have distribution errors an attacker could in principle exploit, so noise is drawn exactly.

Poisson(lam) for an integer mean lam >= 1 by rejection from a "block-geometric" proposal around
the mode m = lam: a fair coin sequence picks a block b >= 0 (probability 2**-(b+1)), a fair coin
the side, and a uniform offset u in [0, w) gives k = m +- (b*w + u). The proposal mass of k at
distance j = b*w + u > 0 is 2**-b / (4w); the candidate is accepted with probability
p(k)/p(m) * 2**b, which is rational (e**-lam cancels: p(m+j)/p(m) = lam**j m!/(m+j)!), so the
Bernoulli is an exact comparison of a uniform with an integer fraction (a float estimate with a
wide safety band only skips the big-integer arithmetic where it cannot change the outcome). The
negative-side copy of j = 0 is rejected, so the mode has mass 2/(4w) too. This is a valid
rejection sampler (acceptance <= 1) because the Poisson pmf is log-concave: with w the smallest
width where p(m +- w) <= p(m)/2, concavity of log p(m + j) - log p(m) (zero at j = 0) gives
p(m +- j) <= p(m) * 2**-floor(j/w).
The expected number of proposals is about 4w p(m) ~ 1.9, independent of lam; w ~ 1.2 sqrt(lam).
"""

from __future__ import annotations

import math
import random
from typing import Protocol

import numpy as np

FLOAT_BAND = 1e-6


class BitSource(Protocol):
    """Anything with `getrandbits`: random.SystemRandom (the OS CSPRNG) in production; tests may
    pass a seeded random.Random to make a statistical test deterministic."""

    def getrandbits(self, k: int, /) -> int: ...


def os_randomness() -> BitSource:
    """The OS's cryptographic randomness (os.urandom behind random.SystemRandom)."""
    return random.SystemRandom()


def _below(source: BitSource, n: int) -> int:
    """A uniform integer in [0, n) by rejection on n.bit_length() random bits (exact)."""
    bits = n.bit_length()
    while True:
        value = source.getrandbits(bits)
        if value < n:
            return value


def _ratio_to_mode(lam: int, mode: int, k: int) -> tuple[int, int]:
    """p(k)/p(mode) of Poisson(lam) as an exact fraction (numerator, denominator), k >= 0."""
    if k >= mode:
        return lam ** (k - mode), math.prod(range(mode + 1, k + 1))
    return math.prod(range(k + 1, mode + 1)), lam ** (mode - k)


def _halves(lam: int, w: int) -> bool:
    """Whether p(m+w) <= p(m)/2 and (m-w < 0 or p(m-w) <= p(m)/2) for Poisson(lam), m = lam."""
    num, den = _ratio_to_mode(lam, lam, lam + w)
    if 2 * num > den:
        return False
    if w > lam:
        return True
    num, den = _ratio_to_mode(lam, lam, lam - w)
    return 2 * num <= den


def block_width(lam: int) -> int:
    """The smallest width w >= 1 that halves the pmf on both sides of the mode (exact arithmetic)."""
    low, high = 0, max(1, math.isqrt(lam))  # _halves(0) is false
    while not _halves(lam, high):
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _halves(lam, mid) else (mid, high)
    return high


def _bernoulli_ratio(source: BitSource, lam: int, k: int, block: int) -> bool:
    """True with probability exactly p(k)/p(lam) * 2**block for Poisson(lam).

    A uniform U in [0, 1) is revealed 64 bits at a time. The first 64 bits are compared with a
    float estimate of the probability widened by a relative band of FLOAT_BAND (a thousand times
    libm's lgamma error at these arguments); only a U inside the band (probability about
    2 * FLOAT_BAND) goes to the exact comparison with the integer fraction, refined until decided.
    """
    top = source.getrandbits(64)
    log_p = (k - lam) * math.log(lam) - math.lgamma(k + 1) + math.lgamma(lam + 1) + block * math.log(2.0)
    if (top + 1) / 2.0**64 < math.exp(log_p - FLOAT_BAND):
        return True
    if top / 2.0**64 > math.exp(log_p + FLOAT_BAND):
        return False
    num, den = _ratio_to_mode(lam, lam, k)
    num <<= block
    shift = 64
    while True:
        if (top + 1) * den <= num << shift:
            return True
        if top * den >= num << shift:
            return False
        top, shift = (top << 64) | source.getrandbits(64), shift + 64


class PoissonSampler:
    """Exact Poisson(lam) samples for one integer mean (the block width is computed once)."""

    def __init__(self, lam: int, source: BitSource | None = None) -> None:
        if int(lam) != lam or lam < 1:
            raise ValueError(f"the exact Poisson sampler needs an integer mean >= 1, got {lam}")
        self.lam = int(lam)
        self.width = block_width(self.lam)
        self.source = source if source is not None else os_randomness()

    def sample(self) -> int:
        lam, width, source = self.lam, self.width, self.source
        while True:
            block = 0
            while source.getrandbits(1):
                block += 1
            negative = source.getrandbits(1) == 1
            distance = block * width + _below(source, width)
            if negative and distance == 0:
                continue
            k = lam - distance if negative else lam + distance
            if k < 0:
                continue
            if _bernoulli_ratio(source, lam, k, block):
                return k

    def samples(self, count: int) -> np.ndarray:
        return np.array([self.sample() for _ in range(count)], dtype=np.int64)


class SkellamSampler:
    """Exact symmetric Skellam Sk(lam) = Poisson(lam) - Poisson(lam) samples: variance 2*lam, and a
    sum of independent Sk(lam_i) is Sk(sum lam_i), which is what makes per-device shares exact."""

    def __init__(self, lam: int, source: BitSource | None = None) -> None:
        self.poisson = PoissonSampler(lam, source)

    @property
    def variance(self) -> int:
        return 2 * self.poisson.lam

    def samples(self, count: int) -> np.ndarray:
        return self.poisson.samples(count) - self.poisson.samples(count)
