"""The parameters the server and every client of a session must agree on (from the method settings)."""

from __future__ import annotations

from dataclasses import dataclass

from fedprompt.common.secagg.modulus import Modulus

MAX_CLIENT_ID = (1 << 32) - 2
"""Client ids travel as uint32 and share x-coordinates are id + 1."""


@dataclass(frozen=True)
class SecAggConfig:
    """`threshold` shares of a client's secrets are needed to recover them (and fewer reveal nothing);
    `degree` None is the complete graph, an even number k a k-regular SecAgg+ graph."""

    vector_length: int
    threshold: int
    modulus_bits: int = 32
    degree: int | None = None

    def __post_init__(self) -> None:
        if self.vector_length < 1:
            raise ValueError(f"vector_length must be at least 1, got {self.vector_length}")
        if self.threshold < 2:
            raise ValueError(
                f"threshold must be at least 2 (1 gives any one peer the secrets), got {self.threshold}"
            )
        Modulus(self.modulus_bits)  # validates the range
        if self.degree is not None and (self.degree % 2 or self.degree < self.threshold):
            raise ValueError(f"degree must be even and >= the threshold {self.threshold}, got {self.degree}")

    @property
    def modulus(self) -> Modulus:
        return Modulus(self.modulus_bits)
