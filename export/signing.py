"""Signing keys for bundles: `fedprompt export --keygen DIR` makes an Ed25519 key pair, and
`fedprompt export ... --sign-key KEY` writes manifest.sig over the exact bytes of manifest.json.
Devices and `fedprompt verify --trust-key` check it (edge_client.bundle_signature)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from edge_client.bundle_signature import fingerprint
from export.errors import ExportError

PRIVATE_KEY_FILE = "bundle-signing.key"
PUBLIC_KEY_FILE = "bundle-signing.pub"


def generate_key_pair(out: Path) -> tuple[Path, Path]:
    """Write a new private key (PEM PKCS#8, unencrypted, mode 0600) and its public key (PEM) into
    `out`; never overwrite an existing key. Returns (private, public) paths."""
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    existing = [p for p in (private_path, public_path) if p.exists()]
    if existing:
        raise ExportError(
            f"{existing[0]} exists; a signing key is never overwritten (choose another --keygen DIR)"
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public_path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key from a PEM file; one-line ExportError otherwise."""
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise ExportError(f"cannot read signing key {path}: {error.strerror or error}") from error
    except (ValueError, TypeError) as error:
        raise ExportError(f"{path} is not an unencrypted PEM private key") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise ExportError(
            f"{path} is not an Ed25519 private key (make one with fedprompt export --keygen DIR)"
        )
    return key


def key_name(key: Ed25519PrivateKey) -> str:
    """Fingerprint of the key pair (of its public half), as verify prints it."""
    return fingerprint(key.public_key())
