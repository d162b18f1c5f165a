"""Epsilon of the distributed Skellam mechanism: the paper's RDP bound composed over rounds.

Agarwal, Kairouz, Liu (NeurIPS 2021), Theorem 3.5 / Corollary 3.6: adding Skellam noise of
per-coordinate variance mu to an integer vector with L1 and L2 sensitivities D1, D2 is
(alpha, eps(alpha))-RDP for every integer alpha > 1 with

    eps(alpha) = alpha D2^2 / (2 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)).

The first term is the Gaussian mechanism's RDP at the same variance; the rest is the price of
discreteness, small once mu >> D1. RDP adds over rounds; the conversion to (epsilon, delta) is
opacus' (Balle et al. 2020), the one fedprompt's Gaussian RDP accountant uses. No subsampling
amplification is claimed (the server chooses who takes part), and the variance of a round is the
one at the secure-aggregation threshold, the fewest survivors a round accepts (the worst case).

Labels: dp "distributed", accountant "skellam" (fedprompt.common.privacy_labels). Adjacency is
fedprompt's client-level replace-one: two neighbouring
runs differ in one device's integer vector, each of squared norm <= B, so D2 = 2 sqrt(B) and
D1 = min(2 * (one device's L1 bound), D2^2).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

from opacus.accountants.analysis.rdp import get_privacy_spent

from fedprompt.common.distributed_dp import SkellamConfig

ORDERS = tuple(range(2, 257))  # the bound holds for integer orders only
Release = tuple[float, float, float, int]  # (L1 sensitivity, squared L2 sensitivity, variance, rounds)


def skellam_rdp(order: int, l1: float, l2_sq: float, variance: float) -> float:
    """The paper's RDP bound of one Skellam release at integer `order` > 1."""
    if order < 2 or int(order) != order:
        raise ValueError(f"the Skellam RDP bound needs an integer order > 1, got {order}")
    discrete = min(((2 * order - 1) * l2_sq + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
    return order * l2_sq / (2 * variance) + discrete


def skellam_epsilon(history: list[Release], delta: float) -> float:
    """Epsilon at `delta` of the composition of the recorded releases (0 for none)."""
    if not history:
        return 0.0
    rdp = [sum(n * skellam_rdp(a, l1, l2_sq, var) for l1, l2_sq, var, n in history) for a in ORDERS]
    return _to_epsilon(rdp, delta)


def _to_epsilon(rdp: list[float], delta: float) -> float:
    """opacus' RDP to (epsilon, delta) conversion over ORDERS (quiet when order 2 is optimal,
    as it is at large epsilons: the Skellam bound has no fractional orders below 2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)[0])


def replace_one_sensitivity(config: SkellamConfig) -> tuple[float, float]:
    """(D1, D2^2) of the round's integer sum under replace-one adjacency of one device."""
    l2_sq = 4.0 * config.l2_bound_sq
    return min(2.0 * config.l1_bound, l2_sq), l2_sq


def round_release(config: SkellamConfig, rounds: int = 1) -> Release:
    """The release `rounds` rounds of this configuration make, at the threshold's variance."""
    l1, l2_sq = replace_one_sensitivity(config)
    return (l1, l2_sq, float(config.central_variance(config.threshold)), int(rounds))


def gaussian_epsilon(l2_sq: float, variance: float, rounds: int, delta: float) -> float:
    """The continuous Gaussian mechanism at the same variance and L2 sensitivity, same orders and
    conversion: the yardstick the Skellam bound approaches as the variance grows."""
    return _to_epsilon([rounds * a * l2_sq / (2 * variance) for a in ORDERS], delta)


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    rounds: int,
    make_config: Callable[[float], SkellamConfig],
    low: float = 0.05,
    high: float = 200.0,
) -> float:
    """The smallest noise multiplier (to 0.1%) whose configuration `make_config(sigma)` spends at
    most `epsilon` over `rounds` rounds: calibration for a target epsilon."""

    def spent(sigma: float) -> float:
        return skellam_epsilon([round_release(make_config(sigma), rounds)], delta)

    if spent(high) > epsilon:
        raise ValueError(f"even noise multiplier {high:g} spends more than epsilon {epsilon:g}")
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if spent(mid) <= epsilon else (mid, high)
    return high
