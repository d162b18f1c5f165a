"""Addresses as both ends see them: which hosts are loopback, where plaintext gRPC is acceptable.

TLS is on by default for every other address, on the aggregator (it refuses to listen) and on the
client (it verifies the server), so this one rule decides where the default changes.
"""

from __future__ import annotations

import ipaddress


class AddressError(ValueError):
    """An address that is not HOST:PORT; the message is one line."""


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IPv4/IPv6 literal, brackets allowed) only reaches this machine."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


SESSION_METADATA = "fedprompt-session"
TOKEN_METADATA = "fedprompt-token"
"""Call metadata that shows a client's session (or, to enrol, its token) before any message: the
aggregator's door (`aggregator.door`) then counts the call against that client instead of among
strangers."""


REFUSAL_METADATA = "fedprompt-refusal"
"""Trailing metadata of a refusal; "final": no update of this device can ever be accepted by the run."""


def session_metadata(session: str) -> tuple[tuple[str, str], ...]:
    return ((SESSION_METADATA, session),)


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA, token),)
