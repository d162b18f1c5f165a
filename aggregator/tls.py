"""The daemon's TLS credentials from its config, checked before listening.

grpc reports a bad certificate or key only as an opaque failure to start; reading them with
`cryptography` first turns each mistake (missing file, not PEM, key of another certificate,
expired certificate) into one line naming the config key.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aggregator.config import AggregatorConfig, ConfigError


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"server.{key}: cannot read {path} ({error.strerror})") from None


def _certificate(data: bytes, key: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"server.{key} is not a PEM certificate") from None


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    cert = _certificate(cert_pem, "tls_cert")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError("server.tls_key is not an unencrypted PEM private key") from None
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise ConfigError("server.tls_key is not the private key of server.tls_cert")
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        raise ConfigError(f"server.tls_cert expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def server_credentials(config: AggregatorConfig) -> grpc.ServerCredentials | None:
    """TLS credentials (requiring client certificates when `tls_client_ca` is set), or None for a
    plaintext listener (loopback, or `allow_insecure`)."""
    server = config.server
    if not server.tls_cert:
        return None
    cert = _read(config.path(server.tls_cert), "tls_cert")
    key = _read(config.path(server.tls_key), "tls_key")
    _check_pair(cert, key)
    client_ca = None
    if server.tls_client_ca:
        client_ca = _read(config.path(server.tls_client_ca), "tls_client_ca")
        _certificate(client_ca, "tls_client_ca")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def security_label(config: AggregatorConfig) -> str:
    """How the daemon listens, for its log."""
    if config.server.tls_client_ca:
        return "mutual TLS"
    return "TLS" if config.server.tls_cert else "plaintext"
