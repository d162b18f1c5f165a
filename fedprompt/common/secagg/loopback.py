"""Runs a whole secure-aggregation session in one process, the way a transport would drive it.

Every message is serialised with `to_bytes` and parsed with `from_bytes` at each hop, exactly the
bytes a gRPC transport would carry, and each party's compute time and traffic are metered. Tests
and the benchmark use it; it is also the reference for the order in which a transport calls the API.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from time import perf_counter
from typing import TypeVar

import numpy as np

from fedprompt.common.secagg.client import SecAggClient
from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.messages import (
    KeyAdvertisement,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from fedprompt.common.secagg.randomness import SEED_BYTES, RandomBytes
from fedprompt.common.secagg.server import AggregateResult, SecAggServer

M = TypeVar(
    "M", KeyAdvertisement, Roster, ShareUpload, ShareDelivery, MaskedInput, UnmaskRequest, UnmaskResponse
)
SERVER = -1
"""The server's key in `LoopbackRun.seconds`."""


class DropStage(Enum):
    """When a client stops answering."""

    BEFORE_SHARING = "after advertising its keys, before sharing them"
    BEFORE_UPLOAD = "after sharing its keys, before uploading its masked input"
    BEFORE_UNMASKING = "after uploading, before answering the unmask request"


@dataclass
class LoopbackRun:
    """The server's result plus what the session cost: compute seconds per party, bytes per client."""

    result: AggregateResult | None = None
    seconds: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    bytes_up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_down: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    @contextmanager
    def timing(self, party: int) -> Iterator[None]:
        start = perf_counter()
        yield
        self.seconds[party] += perf_counter() - start

    def send_up(self, client_id: int, message: M) -> M:
        """Client -> server: serialise, count, and parse on the server's side (its time)."""
        data = message.to_bytes()
        self.bytes_up[client_id] += len(data)
        with self.timing(SERVER):
            return type(message).from_bytes(data)

    def send_down(self, client_id: int, message: M) -> M:
        """Server -> client: serialise, count, and parse on the client's side (its time)."""
        data = message.to_bytes()
        self.bytes_down[client_id] += len(data)
        with self.timing(client_id):
            return type(message).from_bytes(data)


def run_loopback(
    config: SecAggConfig,
    inputs: Mapping[int, np.ndarray],
    session_id: bytes,
    dropouts: Mapping[int, DropStage] | None = None,
    seed: bytes | None = None,
) -> LoopbackRun:
    """One session over `inputs` (client id -> quantised vector); clients in `dropouts` stop at their
    stage. With `seed`, every client's randomness is derived from it and the run is reproducible.
    Raises what the protocol raises, e.g. TooManyDropoutsError."""
    dropouts = dropouts or {}
    master = None if seed is None else RandomBytes(seed)
    clients = {
        i: SecAggClient(i, config, None if master is None else RandomBytes(master.take(SEED_BYTES)))
        for i in sorted(inputs)
    }
    server = SecAggServer(config, session_id)
    run = LoopbackRun()

    def alive(i: int, stage: DropStage) -> bool:
        order = list(DropStage)
        return i not in dropouts or order.index(dropouts[i]) > order.index(stage)

    for i, client in clients.items():
        with run.timing(i):
            advertisement = client.advertise()
        advertisement = run.send_up(i, advertisement)
        with run.timing(SERVER):
            server.add_advertisement(advertisement)
    with run.timing(SERVER):
        roster = server.roster()
    for i in (i for i in clients if alive(i, DropStage.BEFORE_SHARING)):
        received = run.send_down(i, roster)
        with run.timing(i):
            upload = clients[i].share_keys(received)
        upload = run.send_up(i, upload)
        with run.timing(SERVER):
            server.add_share_upload(upload)
    with run.timing(SERVER):
        deliveries = server.deliveries()
    for i in (i for i in deliveries if alive(i, DropStage.BEFORE_UPLOAD)):
        delivery = run.send_down(i, deliveries[i])
        with run.timing(i):
            masked = clients[i].mask(delivery, inputs[i])
        masked = run.send_up(i, masked)
        with run.timing(SERVER):
            server.add_masked_input(masked)
    with run.timing(SERVER):
        request = server.unmask_request()
    for i in (i for i in request.survivors if alive(i, DropStage.BEFORE_UNMASKING)):
        received = run.send_down(i, request)
        with run.timing(i):
            response = clients[i].unmask(received)
        response = run.send_up(i, response)
        with run.timing(SERVER):
            server.add_unmask_response(response)
    with run.timing(SERVER):
        run.result = server.result()
    return run
