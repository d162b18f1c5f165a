"""How the client secures its channel: TLS by default outside loopback, mutual TLS on request.

- `--ca-cert` (or a client certificate): TLS, trusting that CA (e.g. from `fedprompt aggregator certs`).
- neither, non-loopback aggregator: TLS, trusting the system's roots (a public certificate).
- neither, loopback aggregator, or `--insecure`: plaintext.

grpc reports a failed handshake as UNAVAILABLE, like a server that is down; `tls_failure` tells
the two apart so the client stops at once with a line that says what to fix instead of retrying.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedprompt.common.network import is_loopback, split_address

_TLS_REASON = re.compile(r"Tls handshake failed.*?OPENSSL_internal:([A-Z_]+)")
_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": "the aggregator's certificate is not trusted: pass the CA that signed it "
    "with --ca-cert (or check that it names the host you dial)",
    "WRONG_VERSION_NUMBER": "the aggregator does not speak TLS on this port: use --insecure only if it "
    "is meant to be plaintext",
}


class TLSSettingsError(ValueError):
    """Certificate options that cannot be used; the message is one line."""


@dataclass(frozen=True)
class ChannelSecurity:
    """What the client presents and trusts; `credentials` is None for plaintext."""

    credentials: grpc.ChannelCredentials | None
    label: str  # "plaintext" | "TLS" | "mutual TLS", for logs and hints

    @property
    def client_certificate(self) -> bool:
        return self.label == "mutual TLS"


def _read(path: Path, option: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TLSSettingsError(f"{option} {path}: {error.strerror}") from None


def channel_security(
    address: str,
    ca_cert: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    insecure: bool = False,
) -> ChannelSecurity:
    """Credentials for dialling `address` under the rules in the module docstring."""
    if (client_cert is None) != (client_key is None):
        raise TLSSettingsError("--client-cert and --client-key go together")
    wants_tls = ca_cert is not None or client_cert is not None
    if insecure and wants_tls:
        raise TLSSettingsError("--insecure cannot be combined with certificate options")
    host, _ = split_address(address)
    if not wants_tls and (insecure or is_loopback(host)):
        return ChannelSecurity(None, "plaintext")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca_cert, "--ca-cert") if ca_cert else None,
        private_key=_read(client_key, "--client-key") if client_key else None,
        certificate_chain=_read(client_cert, "--client-cert") if client_cert else None,
    )
    return ChannelSecurity(credentials, "mutual TLS" if client_cert else "TLS")


def tls_failure(details: str) -> str | None:
    """What to fix, if an UNAVAILABLE error's details show a failed TLS handshake."""
    found = _TLS_REASON.search(details or "")
    if found is None:
        return None
    reason = found.group(1)
    return f"TLS handshake failed ({reason}): " + _HINTS.get(reason, "check the certificate options")


def closed_socket_hint(security: ChannelSecurity, details: str) -> str:
    """A hint for a connection the server kept closing: usually a TLS mismatch."""
    if "Socket closed" not in (details or ""):
        return ""
    if security.label == "plaintext":
        return "; if the aggregator uses TLS, pass --ca-cert"
    if not security.client_certificate:
        return "; if the aggregator requires client certificates, pass --client-cert and --client-key"
    return ""
