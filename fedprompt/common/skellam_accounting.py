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

import argparse
import math
import warnings
from collections.abc import Callable

from opacus.accountants.analysis.rdp import get_privacy_spent

from fedprompt.common.distributed_dp import SkellamConfig, default_scale

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


def matched_to_local(
    clip: float, dim: int, clients: int, rounds: int, local_noise_multiplier: float, threshold: int
) -> SkellamConfig:
    """The distributed configuration whose noise in the sum of all `clients` equals that of
    `clients` local-DP uploads (variance clients * (sigma clip)^2): the same noise in the averaged
    update, with each device's share sized so `threshold` survivors still carry its target."""
    return SkellamConfig(
        clip=clip,
        noise_multiplier=local_noise_multiplier * math.sqrt(threshold),
        threshold=threshold,
        max_clients=clients,
        dim=dim,
        scale=default_scale(clip, dim),
    )


def main(argv: list[str] | None = None) -> None:
    """Epsilon of local DP against distributed Skellam DP at the same noise in the average."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--clip", type=float, default=0.2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--noise-multiplier", type=float, default=1.5, help="the local-DP one")
    parser.add_argument("--thresholds", type=int, nargs="+", default=[16, 12, 8])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    args = parser.parse_args(argv)
    sigma, clip = args.noise_multiplier, args.clip
    local = gaussian_epsilon(4 * clip**2, (sigma * clip) ** 2, args.rounds, args.delta)
    print(f"local DP, sigma {sigma:g}: epsilon {local:.2f} (Gaussian RDP, integer orders 2..256)")
    print(f"at the same per-device noise (sum of {args.clients} with the local runs' variance):")
    for threshold in args.thresholds:
        config = matched_to_local(clip, args.dim, args.clients, args.rounds, sigma, threshold)
        release = round_release(config, args.rounds)
        skellam = skellam_epsilon([release], args.delta)
        gaussian = gaussian_epsilon(release[1], release[2], args.rounds, args.delta)
        print(
            f"distributed, threshold {threshold}: epsilon {skellam:.2f} "
            f"(Gaussian at the same variance {gaussian:.2f}; {local / skellam:.1f}x below local) | "
            f"{config.summary()}"
        )

    print(f"noise std in the average of {args.clients} updates, in units of clip, for a target epsilon:")
    scale = default_scale(clip, args.dim)
    for epsilon in args.epsilons:
        local_sigma = _local_sigma_for(epsilon, args.delta, args.rounds)
        cells = [f"epsilon {epsilon:g}: local {local_sigma / math.sqrt(args.clients):.3f}"]
        for threshold in args.thresholds:

            def make(noise: float, threshold: int = threshold) -> SkellamConfig:
                return SkellamConfig(clip, noise, threshold, args.clients, args.dim, scale)

            config = make(noise_multiplier_for(epsilon, args.delta, args.rounds, make))
            average_std = math.sqrt(config.central_variance(args.clients)) / config.scale / args.clients
            cells.append(f"distributed t={threshold} {average_std / clip:.3f}")
        print(" | ".join(cells))


def _local_sigma_for(epsilon: float, delta: float, rounds: int) -> float:
    """Client-level local DP's noise multiplier for `epsilon` (same RDP orders, to 0.1%)."""
    low, high = 0.05, 500.0
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if gaussian_epsilon(4.0, mid**2, rounds, delta) <= epsilon else (mid, high)
    return high


if __name__ == "__main__":
    main()
