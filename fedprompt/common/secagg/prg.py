"""Masks: a 32-byte seed expanded into a uniform vector modulo 2**bits by AES-256 in counter mode.

Each seed is used as a key exactly once per session (self-mask seeds are fresh, pairwise seeds are
HKDF outputs bound to the session), so a fixed counter start is safe.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedprompt.common.secagg.modulus import Modulus


def expand_mask(seed: bytes, length: int, modulus: Modulus) -> np.ndarray:
    """`length` elements modulo `modulus`, indistinguishable from uniform without `seed`."""
    keystream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return modulus.uniform(keystream.update(bytes(length * modulus.width)), length)


def pairwise_sign(client_id: int, peer_id: int) -> int:
    """+1 for the smaller id of a pair, -1 for the larger: the pair's two masks cancel in the sum."""
    return 1 if client_id < peer_id else -1
