"""Test helpers: drive a secure-aggregation session step by step through the public API, with every
message serialised and parsed as a transport would, so tests can stop, inspect or tamper midway."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedprompt.common.secagg.client import SecAggClient
from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.graph import neighbourhoods
from fedprompt.common.secagg.loopback import enrolled_clients
from fedprompt.common.secagg.messages import Roster, ShareDelivery, SignedSurvivors, UnmaskRequest
from fedprompt.common.secagg.server import SecAggServer

SESSION = b"run-7/round-3"
SEED = bytes(range(32))


def wire(message):
    """What a transport does to every message: bytes out, bytes in."""
    return type(message).from_bytes(message.to_bytes())


def seeded_clients(
    config: SecAggConfig, ids: Iterable[int], session: bytes = SESSION, seed: bytes = SEED
) -> dict[int, SecAggClient]:
    return enrolled_clients(config, ids, session, seed)


def quantised_inputs(config: SecAggConfig, ids: Iterable[int], seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        i: rng.integers(0, config.modulus.value // 64, config.vector_length, dtype=np.uint64) for i in ids
    }


def plain_sum(config: SecAggConfig, inputs: dict[int, np.ndarray], ids: Iterable[int]) -> np.ndarray:
    return sum(inputs[i] for i in ids) % np.uint64(config.modulus.value)


def until_masking(
    config: SecAggConfig, ids: Iterable[int], session: bytes = SESSION, seed: bytes = SEED
) -> tuple[dict[int, SecAggClient], SecAggServer, dict[int, ShareDelivery]]:
    """Clients and server after key sharing, and each client's delivery of shares."""
    clients = seeded_clients(config, ids, session, seed)
    server = SecAggServer(config, session)
    for client in clients.values():
        server.add_advertisement(wire(client.advertise()))
    roster = wire(server.roster())
    for client in clients.values():
        server.add_share_upload(wire(client.share_keys(roster)))
    return clients, server, {i: wire(d) for i, d in server.deliveries().items()}


def until_unmasking(
    config: SecAggConfig, inputs: dict[int, np.ndarray]
) -> tuple[dict[int, SecAggClient], SecAggServer, UnmaskRequest]:
    """Clients and server after every client uploaded its masked input, and the unmask request."""
    clients, server, deliveries = until_masking(config, inputs)
    for i, client in clients.items():
        server.add_masked_input(wire(client.mask(deliveries[i], inputs[i])))
    return clients, server, wire(server.unmask_request())


def until_signed(
    config: SecAggConfig, inputs: dict[int, np.ndarray]
) -> tuple[dict[int, SecAggClient], SecAggServer, UnmaskRequest, SignedSurvivors]:
    """As `until_unmasking`, then every client signed the request: the signatures each is sent."""
    clients, server, request = until_unmasking(config, inputs)
    for client in clients.values():
        server.add_survivor_signature(wire(client.sign_survivors(request)))
    return clients, server, request, wire(server.signed_survivors())


def roster_graph(
    config: SecAggConfig, ids: Iterable[int], session: bytes = SESSION, seed: bytes = SEED
) -> dict[int, frozenset[int]]:
    """The neighbour graph a seeded session over `ids` will use (it depends on the clients' keys)."""
    clients = seeded_clients(config, ids, session, seed)
    roster = Roster(session, tuple(client.advertise() for client in clients.values()))
    return neighbourhoods(clients, config.degree, roster.graph_seed)
