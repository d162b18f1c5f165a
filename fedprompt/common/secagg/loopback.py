"""Runs a whole secure-aggregation session in one process, the way a transport would drive it.

Every message is serialised with `to_bytes` and parsed with `from_bytes` at each hop, exactly the
bytes a gRPC transport would carry, and each party's compute time and traffic are metered. Tests
and the benchmark use it; it is also the reference for the order in which a transport calls the API.

`LoopbackDriver` is the honest server's side; a test subclasses it to play a malicious aggregator
(each `*_for` hook decides what one client is sent), and the run records which clients refused
and which answered, so the test can show that no honest client revealed anything.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from time import perf_counter
from typing import TypeVar

import numpy as np

from fedprompt.common.secagg.client import SecAggClient
from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.errors import SecAggError
from fedprompt.common.secagg.identity import DeviceIdentity
from fedprompt.common.secagg.messages import (
    KeyAdvertisement,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareUpload,
    SignedSurvivors,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from fedprompt.common.secagg.policy import ThresholdFloor
from fedprompt.common.secagg.randomness import SEED_BYTES, RandomBytes
from fedprompt.common.secagg.server import AggregateResult, SecAggServer

M = TypeVar(
    "M",
    KeyAdvertisement,
    Roster,
    ShareUpload,
    ShareDelivery,
    MaskedInput,
    UnmaskRequest,
    SurvivorSignature,
    SignedSurvivors,
    UnmaskResponse,
)
SERVER = -1
"""The server's key in `LoopbackRun.seconds`."""


class DropStage(Enum):
    """When a client stops answering."""

    BEFORE_SHARING = "after advertising its keys, before sharing them"
    BEFORE_UPLOAD = "after sharing its keys, before uploading its masked input"
    BEFORE_SIGNING = "after uploading, before signing the survivor list"
    BEFORE_UNMASKING = "after signing the survivor list, before answering the unmask request"


@dataclass
class LoopbackRun:
    """The server's result plus what the session cost: compute seconds per party, bytes per client."""

    result: AggregateResult | None = None
    refusals: dict[int, str] = field(default_factory=dict)  # client -> why it refused the session
    responses: dict[int, UnmaskResponse] = field(default_factory=dict)  # the unmask answers sent
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


class LoopbackDriver:
    """The honest server's side of a loopback session: every client is sent what `SecAggServer`
    builds. Override a `*_for` hook to send one client something else."""

    def __init__(self, config: SecAggConfig, session_id: bytes) -> None:
        self.server = SecAggServer(config, session_id)
        self.config = config

    def roster_for(self, client_id: int, roster: Roster) -> Roster:
        return roster

    def delivery_for(self, client_id: int, delivery: ShareDelivery) -> ShareDelivery:
        return delivery

    def request_for(self, client_id: int, request: UnmaskRequest) -> UnmaskRequest:
        return request

    def signatures_for(self, client_id: int, signed: SignedSurvivors) -> SignedSurvivors:
        return signed

    def add_survivor_signature(self, message: SurvivorSignature) -> None:
        self.server.add_survivor_signature(message)

    def signed_survivors(self) -> SignedSurvivors:
        return self.server.signed_survivors()

    def add_unmask_response(self, message: UnmaskResponse) -> None:
        self.server.add_unmask_response(message)

    def result(self) -> AggregateResult | None:
        return self.server.result()


def enrolled_clients(
    config: SecAggConfig,
    ids: Iterable[int],
    session_id: bytes,
    seed: bytes | None = None,
    floor: ThresholdFloor | None = None,
) -> dict[int, SecAggClient]:
    """Clients with long-term identities registered in one directory that every client trusts
    (what enrolment gives a device); with `seed`, reproducible byte for byte."""
    master = None if seed is None else RandomBytes(seed)

    def randomness() -> RandomBytes | None:
        return None if master is None else RandomBytes(master.take(SEED_BYTES))

    ids = sorted(ids)
    identities = {i: DeviceIdentity.generate(randomness()) for i in ids}
    directory = {i: identity.public_key for i, identity in identities.items()}

    def trust(client_id: int, identity_key: bytes) -> bool:
        return directory.get(client_id) == identity_key

    return {i: SecAggClient(i, config, session_id, identities[i], trust, randomness(), floor) for i in ids}


def run_loopback(
    config: SecAggConfig,
    inputs: Mapping[int, np.ndarray],
    session_id: bytes,
    dropouts: Mapping[int, DropStage] | None = None,
    seed: bytes | None = None,
    driver: LoopbackDriver | None = None,
    clients: Mapping[int, SecAggClient] | None = None,
) -> LoopbackRun:
    """One session over `inputs` (client id -> quantised vector); clients in `dropouts` stop at their
    stage. With `seed`, every client's randomness is derived from it and the run is reproducible.
    A client that refuses a step is recorded in `refusals` and sends nothing more. Raises what the
    server raises, e.g. TooManyDropoutsError."""
    dropouts = dropouts or {}
    clients = clients or enrolled_clients(config, inputs, session_id, seed)
    driver = driver or LoopbackDriver(config, session_id)
    server = driver.server
    run = LoopbackRun()
    uploaded: list[int] = []
    signers: list[int] = []

    def alive(i: int, stage: DropStage) -> bool:
        order = list(DropStage)
        return i not in run.refusals and (i not in dropouts or order.index(dropouts[i]) > order.index(stage))

    def answer(i: int, step, message):
        """The client's answer to `message`, or None once it refused."""
        received = run.send_down(i, message)
        with run.timing(i):
            try:
                reply = step(received)
            except SecAggError as error:
                run.refusals[i] = str(error)
                return None
        return run.send_up(i, reply)

    for i, client in clients.items():
        with run.timing(i):
            advertisement = client.advertise()
        advertisement = run.send_up(i, advertisement)
        with run.timing(SERVER):
            server.add_advertisement(advertisement)
    with run.timing(SERVER):
        roster = server.roster()
    for i in (i for i in clients if alive(i, DropStage.BEFORE_SHARING)):
        upload = answer(i, clients[i].share_keys, driver.roster_for(i, roster))
        if upload is not None:
            with run.timing(SERVER):
                server.add_share_upload(upload)
    with run.timing(SERVER):
        deliveries = server.deliveries()
    for i in (i for i in deliveries if alive(i, DropStage.BEFORE_UPLOAD)):
        masked = answer(
            i, lambda d, i=i: clients[i].mask(d, inputs[i]), driver.delivery_for(i, deliveries[i])
        )
        if masked is not None:
            uploaded.append(i)
            with run.timing(SERVER):
                server.add_masked_input(masked)
    with run.timing(SERVER):
        request = server.unmask_request()
    for i in (i for i in uploaded if alive(i, DropStage.BEFORE_SIGNING)):
        signature = answer(i, clients[i].sign_survivors, driver.request_for(i, request))
        if signature is not None:
            signers.append(i)
            with run.timing(SERVER):
                driver.add_survivor_signature(signature)
    with run.timing(SERVER):
        signed = driver.signed_survivors()
    for i in (i for i in signers if alive(i, DropStage.BEFORE_UNMASKING)):
        response = answer(i, clients[i].unmask, driver.signatures_for(i, signed))
        if response is not None:
            run.responses[i] = response
            with run.timing(SERVER):
                driver.add_unmask_response(response)
    with run.timing(SERVER):
        run.result = driver.result()
    return run
