"""Key agreement and share encryption: X25519, HKDF-SHA256 and AES-GCM from `cryptography`.

Every client holds two fresh X25519 key pairs per session: a mask key pair, whose agreement with a
peer gives the pairwise mask seed (and whose private key is secret-shared, so the server can remove
the pairwise masks of a client that drops out), and a share key pair, whose agreement gives the
AES-GCM key that encrypts the Shamir shares sent to that peer through the server. HKDF binds every
derived key to the session id and to its purpose; share keys are also bound to their direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedprompt.common.secagg.errors import ProtocolError, ShareDecryptionError
from fedprompt.common.secagg.randomness import RandomBytes

KEY_BYTES = 32
NONCE_BYTES = 12
_LABEL = b"fedprompt-secagg-v1/"


@dataclass(frozen=True)
class SessionKeys:
    """One client's two key pairs for one session; never reused across sessions."""

    mask: X25519PrivateKey
    share: X25519PrivateKey

    @classmethod
    def generate(cls, randomness: RandomBytes) -> SessionKeys:
        return cls(
            mask=X25519PrivateKey.from_private_bytes(randomness.take(KEY_BYTES)),
            share=X25519PrivateKey.from_private_bytes(randomness.take(KEY_BYTES)),
        )


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def private_bytes(private: X25519PrivateKey) -> bytes:
    return private.private_bytes_raw()


def _derive(private: X25519PrivateKey, peer_public: bytes, session_id: bytes, info: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:  # wrong length or a low-order point (all-zero shared secret)
        raise ProtocolError(f"a peer's public key is unusable: {error}") from error
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session_id, info=_LABEL + info).derive(
        shared
    )


def pairwise_mask_seed(private: X25519PrivateKey, peer_public: bytes, session_id: bytes) -> bytes:
    """The seed both ends of a pair derive alike; one adds its mask, the other subtracts it."""
    return _derive(private, peer_public, session_id, b"pairwise-mask")


def _share_key(
    private: X25519PrivateKey, peer_public: bytes, session_id: bytes, sender: int, recipient: int
) -> bytes:
    direction = sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")
    return _derive(private, peer_public, session_id, b"share-encryption/" + direction)


def _associated_data(session_id: bytes, sender: int, recipient: int) -> bytes:
    return _LABEL + session_id + sender.to_bytes(4, "big") + recipient.to_bytes(4, "big")


def encrypt_for_peer(
    private: X25519PrivateKey,
    peer_public: bytes,
    session_id: bytes,
    sender: int,
    recipient: int,
    plaintext: bytes,
    randomness: RandomBytes,
) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) that only `recipient` can open, bound to this session and direction."""
    key = _share_key(private, peer_public, session_id, sender, recipient)
    nonce = randomness.take(NONCE_BYTES)
    return nonce, AESGCM(key).encrypt(nonce, plaintext, _associated_data(session_id, sender, recipient))


def decrypt_from_peer(
    private: X25519PrivateKey,
    peer_public: bytes,
    session_id: bytes,
    sender: int,
    recipient: int,
    nonce: bytes,
    ciphertext: bytes,
) -> bytes:
    """The plaintext `sender` encrypted for `recipient`, or ShareDecryptionError if it was altered."""
    key = _share_key(private, peer_public, session_id, sender, recipient)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, _associated_data(session_id, sender, recipient))
    except InvalidTag as error:
        raise ShareDecryptionError(
            f"the share from client {sender} to client {recipient} failed authentication "
            "(tampered, from another session, or not addressed to this client)"
        ) from error
