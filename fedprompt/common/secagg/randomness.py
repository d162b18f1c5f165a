"""Where a party's secrets (keys, seeds, Shamir coefficients, nonces) come from.

In production the operating system's CSPRNG. Tests and benchmarks pass a seed, and then the bytes
are a ChaCha20 keystream under that seed, so a whole protocol run is reproducible byte for byte.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32


class RandomBytes:
    """A source of secret random bytes: `os.urandom`, or a deterministic stream from a 32-byte seed."""

    def __init__(self, seed: bytes | None = None) -> None:
        if seed is not None and len(seed) != SEED_BYTES:
            raise ValueError(f"a randomness seed must be {SEED_BYTES} bytes, got {len(seed)}")
        self._stream = (
            None if seed is None else Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
        )

    def take(self, count: int) -> bytes:
        if self._stream is None:
            return os.urandom(count)
        return self._stream.update(bytes(count))
