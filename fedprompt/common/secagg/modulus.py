"""Vectors of integers modulo 2**bits, the ring in which masked updates are added.

A power-of-two modulus makes every mask uniform by simply keeping the low bits of a PRG stream,
and numpy's wrap-around uint64 arithmetic is already arithmetic modulo 2**64, hence modulo any
2**bits with bits <= 64. Bits are capped at 53 so that any sum converts to float64 exactly.
"""

from __future__ import annotations

import numpy as np

from fedprompt.common.secagg.errors import MessageFormatError

MIN_BITS = 8
MAX_BITS = 53


class Modulus:
    """Arithmetic and packing of uint64 vectors modulo 2**bits."""

    def __init__(self, bits: int) -> None:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"modulus bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        self.bits = bits
        self.value = 1 << bits
        self._low_bits = np.uint64(self.value - 1)
        self.width = next(w for w in (1, 2, 4, 8) if 8 * w >= bits)
        """Bytes per packed element."""
        self._packed = np.dtype(f"<u{self.width}")

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a + b) & self._low_bits

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a - b) & self._low_bits

    def add_signed(self, a: np.ndarray, b: np.ndarray, sign: int) -> np.ndarray:
        """a + b for sign +1, a - b for sign -1."""
        return self.add(a, b) if sign > 0 else self.sub(a, b)

    def zeros(self, length: int) -> np.ndarray:
        return np.zeros(length, dtype=np.uint64)

    def check(self, values: np.ndarray, length: int) -> np.ndarray:
        """`values` as a uint64 vector of `length` elements in [0, 2**bits), or ValueError."""
        values = np.asarray(values)
        if values.shape != (length,):
            raise ValueError(f"expected a vector of {length} elements, got shape {values.shape}")
        if values.dtype.kind not in "iu":
            raise ValueError(f"expected integers modulo 2**{self.bits}, got dtype {values.dtype}")
        if values.size and (int(values.min()) < 0 or int(values.max()) >= self.value):
            raise ValueError(f"values outside [0, 2**{self.bits})")
        return values.astype(np.uint64)

    def uniform(self, stream: bytes, length: int) -> np.ndarray:
        """`length` uniform elements from `length * width` uniform bytes (low bits kept)."""
        return np.frombuffer(stream, dtype=self._packed, count=length).astype(np.uint64) & self._low_bits

    def pack(self, values: np.ndarray) -> bytes:
        return values.astype(self._packed).tobytes()

    def unpack(self, data: bytes) -> np.ndarray:
        """Packed bytes from the network back to a vector; refuses ragged or out-of-range data."""
        if len(data) % self.width:
            raise MessageFormatError(f"{len(data)} bytes is not a whole number of {self.width}-byte elements")
        values = np.frombuffer(data, dtype=self._packed).astype(np.uint64)
        if values.size and int(values.max()) >= self.value:
            raise MessageFormatError(f"packed values outside [0, 2**{self.bits})")
        return values
