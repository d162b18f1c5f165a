"""Server halves of the federated methods, registered by name."""

from __future__ import annotations

from aggregator.strategies.base import ClientUpdate, ServerStrategy

SERVER_STRATEGIES: dict[str, type[ServerStrategy]] = {}


def register(cls: type[ServerStrategy]) -> type[ServerStrategy]:
    """Class decorator: make a server half available under its `name`."""
    SERVER_STRATEGIES[cls.name] = cls
    return cls


__all__ = ["SERVER_STRATEGIES", "ClientUpdate", "ServerStrategy", "register"]
