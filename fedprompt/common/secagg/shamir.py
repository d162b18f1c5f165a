"""Shamir secret sharing of 32-byte secrets over the prime field of the Mersenne prime 2**521 - 1.

Any `threshold` shares determine the secret by Lagrange interpolation at 0; fewer reveal nothing
about it (every secret is equally consistent with them). A share's x-coordinate is its holder's
client id + 1, so x is never 0 and the holder is implied by who sends the share.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedprompt.common.secagg.errors import MessageFormatError, ProtocolError
from fedprompt.common.secagg.randomness import RandomBytes

PRIME = (1 << 521) - 1
SHARE_BYTES = 66
"""Big-endian bytes of one share value (a field element)."""
SECRET_BYTES = 32


def share_x(client_id: int) -> int:
    """The x-coordinate of the share held by `client_id`."""
    return client_id + 1


def _random_element(randomness: RandomBytes) -> int:
    """Uniform in [0, PRIME) by rejection, so no value is more likely than another."""
    while True:
        candidate = int.from_bytes(randomness.take(SHARE_BYTES), "big") & PRIME
        if candidate < PRIME:
            return candidate


def split(secret: bytes, threshold: int, xs: Iterable[int], randomness: RandomBytes) -> dict[int, int]:
    """Shares {x: y} of `secret` at the points `xs`, any `threshold` of which recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    xs = list(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} impossible with {len(xs)} shares")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_element(randomness) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):
            y = (y * x + coefficient) % PRIME
        shares[x] = y
    return shares


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least `threshold` shares {x: y}; uses the first `threshold` of them."""
    points = list(shares.items())[:threshold]
    if len(points) < threshold:
        raise ValueError(f"{len(points)} shares cannot recover a secret of threshold {threshold}")
    secret = 0
    for j, (x_j, y_j) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (x_m, _) in enumerate(points):
            if m != j:
                numerator = numerator * x_m % PRIME
                denominator = denominator * (x_m - x_j) % PRIME
        secret = (secret + y_j * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ProtocolError("shares are inconsistent: the recovered value is not a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def encode_share(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    y = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or y >= PRIME:
        raise MessageFormatError("a share value is not an element of the field")
    return y
