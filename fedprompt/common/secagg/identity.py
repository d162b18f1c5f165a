"""Long-term device identities: the Ed25519 keys that authenticate a client's session keys and its
view of who survived, so an aggregator cannot substitute a peer's keys or show clients different
survivor lists without it being detected.

A device creates its identity once (`DeviceIdentity.generate`), registers the public half at
enrolment, and signs with it (1) its advertised session keys and (2) the unmask request it was
sent (the consistency round). Every signed payload starts with a purpose label and the session
id, so no signature can be replayed for another purpose or session.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedprompt.common.secagg.errors import ProtocolError
from fedprompt.common.secagg.randomness import RandomBytes

IDENTITY_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_LABEL = b"fedprompt-secagg-v1/sign/"


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's long-term signing key (kept on the device only)."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls, randomness: RandomBytes | None = None) -> DeviceIdentity:
        raw = (randomness or RandomBytes()).take(32)
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def from_bytes(cls, raw: bytes) -> DeviceIdentity:
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self.private.private_bytes_raw()

    @property
    def public_key(self) -> bytes:
        return self.private.public_key().public_bytes_raw()

    def sign(self, payload: bytes) -> bytes:
        return self.private.sign(payload)


def verify(public_key: bytes, payload: bytes, signature: bytes, what: str) -> None:
    """ProtocolError unless `signature` is `public_key`'s signature of `payload`."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
    except (InvalidSignature, ValueError):
        raise ProtocolError(f"{what}: the signature does not verify") from None


def _ids(ids: Sequence[int]) -> bytes:
    return len(ids).to_bytes(4, "big") + b"".join(i.to_bytes(4, "big") for i in ids)


def advertisement_payload(session_id: bytes, client_id: int, mask_key: bytes, share_key: bytes) -> bytes:
    """What a client signs to vouch for its session keys."""
    session = len(session_id).to_bytes(4, "big") + session_id
    return _LABEL + b"keys/" + session + client_id.to_bytes(4, "big") + mask_key + share_key


def survivors_payload(session_id: bytes, survivors: Sequence[int], dropped: Sequence[int]) -> bytes:
    """What a survivor signs in the consistency round: the unmask request it was sent."""
    session = len(session_id).to_bytes(4, "big") + session_id
    return _LABEL + b"survivors/" + session + _ids(sorted(survivors)) + _ids(sorted(dropped))
