"""Ed25519 signatures of bundles: `manifest.sig` signs the exact bytes of `manifest.json`.

The manifest lists the sha256 of every other file, so a valid signature plus matching hashes
authenticates the whole bundle. The signature file is not listed in the manifest (it signs it),
and the bundle's digest (sha256 of manifest.json) does not change when a bundle is signed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

SIGNATURE_FILE = "manifest.sig"


class KeyFileError(ValueError):
    """A key file is missing or is not an Ed25519 key in PEM."""


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (as written by `fedprompt export --keygen`)."""
    path = Path(path)
    try:
        key = load_pem_public_key(path.read_bytes())
    except OSError as error:
        raise KeyFileError(f"cannot read trusted key {path}: {error.strerror or error}") from error
    except ValueError as error:
        raise KeyFileError(f"{path} is not a PEM public key") from error
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is not an Ed25519 public key")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short name of a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    return hashlib.sha256(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def signing_key(
    manifest_bytes: bytes, signature: bytes, trusted: Sequence[Ed25519PublicKey]
) -> Ed25519PublicKey | None:
    """The trusted key whose signature `signature` is over `manifest_bytes`, or None."""
    for key in trusted:
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            continue
        return key
    return None
