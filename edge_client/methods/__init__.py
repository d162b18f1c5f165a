"""Client halves of the federated methods, registered by name."""

from __future__ import annotations

from edge_client.methods.base import ClientMethod, RoundResult, RoundTask

CLIENT_METHODS: dict[str, type[ClientMethod]] = {}


def register(cls: type[ClientMethod]) -> type[ClientMethod]:
    """Class decorator: make a client half available under its `name`."""
    CLIENT_METHODS[cls.name] = cls
    return cls


__all__ = ["CLIENT_METHODS", "ClientMethod", "RoundResult", "RoundTask", "register"]
