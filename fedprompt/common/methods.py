"""The names of the federated methods. Each name has a client half (`edge_client.methods`) and a
server half (`aggregator.strategies`); a test checks that both sides register exactly these."""

from __future__ import annotations

METHOD_NAMES: tuple[str, ...] = ("promptfl", "dpfpl", "pfedmoap", "secfpp")
