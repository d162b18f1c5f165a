"""A federated run in one process: the daemon's round coordinator and store, the device's client
halves, and bytes in between instead of gRPC.

Nothing of a method or of the round logic is re-implemented here. `aggregator.rounds.RoundCoordinator`
plays the rounds in its own driver thread exactly as in `fedprompt aggregator serve` (sampling,
update checks, the method's server half, one SQLite transaction per round); this module plays the
clients: it polls the coordinator, decodes the task payload with the wire codec, runs the client
half from `edge_client.methods`, encodes the update in the run's update encoding (so fp16
rounding happens exactly as on the wire) and submits the bytes, which the coordinator counts. A
method that needs secure aggregation (SecFPP) gets it, and its updates are summed through the
coordinator's SecAggStep logic (`fedprompt.harness.secure_clients`).

Every client is always on and answers at once, so liveness and deadlines never bite: the in-process
rules switch them off (huge timeouts) rather than simulate network time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig, MethodConfig, RoundConfig, ServerConfig
from aggregator.rounds import RoundCoordinator
from aggregator.store import RoundRecord, SQLiteStore
from edge_client.methods.base import ClientMethod, RoundTask
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.workspace import ClientWorkspace
from fedprompt.common.codec import decode_tensor_set, encode_tensor_set
from fedprompt.common.methods import RunSettings
from fedprompt.common.secagg.identity import DeviceIdentity
from fedprompt.harness.secure_clients import SecureUploads, secure_rules
from fedprompt.harness.served_model import served_accuracies

ALWAYS_ON_S = 1e9  # liveness and round timeouts of the in-process run: never reached
IDLE_POLL_S = 0.002  # how long the clients wait before polling again while the server aggregates


@dataclass(frozen=True)
class FederationRules:
    """What the daemon's [rounds] and [server] sections would say for this run."""

    rounds: int
    fraction: float = 1.0
    seed: int = 0
    task_encoding: str = ServerConfig.task_encoding
    update_encoding: str = ServerConfig.update_encoding

    def aggregator_config(self, settings: RunSettings, clients: int, state: Path, bundle: Path):
        """The daemon's config for this run, checked by the daemon's own rules."""
        method = settings.method
        secure, min_fit = secure_rules(method, clients, self.fraction)
        return AggregatorConfig(
            server=ServerConfig(
                state=str(state), task_encoding=self.task_encoding, update_encoding=self.update_encoding
            ),
            rounds=RoundConfig(
                rounds=self.rounds,
                min_clients=clients,
                fraction=self.fraction,
                min_fit=min_fit,
                min_updates=1,
                round_timeout_s=ALWAYS_ON_S,
                client_timeout_s=ALWAYS_ON_S,
                seed=self.seed,
            ),
            method=MethodConfig(method, str(bundle / "manifest.json")),
            secure_aggregation=secure,
            settings=settings,
        ).check()


class _Driver(threading.Thread):
    """The coordinator's round loop, keeping any exception for the client side to re-raise."""

    def __init__(self, coordinator: RoundCoordinator) -> None:
        super().__init__(name="in-process-aggregator", daemon=True)
        self.coordinator = coordinator
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.coordinator.run(retry_failures=False)
        except BaseException as error:  # re-raised in the thread that plays the clients
            self.error = error


UploadHook = Callable[[int, int, dict[str, np.ndarray], dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class FederatedRun:
    """The committed rounds as the store has them, each workspace's client id, and the accuracy
    of the model each client is served after the run (`fedprompt.harness.served_model`)."""

    rounds: list[RoundRecord]
    client_ids: list[str]
    served_accuracy: list[float]


def run_federated(
    settings: RunSettings,
    workspaces: Sequence[ClientWorkspace],
    rules: FederationRules,
    state: Path,
    on_round: Callable[[int], None] | None = None,
    on_upload: UploadHook | None = None,
    classify: bool = True,
) -> FederatedRun:
    """Play `rules.rounds` rounds of the settings' method over the clients' workspaces (all on one
    bundle); the store at `state`
    (which must not exist yet) keeps everything the daemon would. `on_round(round_id)` is called
    after each commit, `on_upload(client index, round, tensors received, tensors sent)` with what
    the server receives from each client (the decoded wire payload; the privacy audit's view).
    `classify` False: no served classifier is scored (captioning methods, whose callers score the
    devices' prompt files)."""
    if state.exists():
        raise FileExistsError(f"{state} exists; an in-process run starts from a fresh state")
    method = settings.method
    config = rules.aggregator_config(settings, len(workspaces), state, workspaces[0].bundle.path)
    store = SQLiteStore(state)
    try:
        coordinator = RoundCoordinator(store, config)
        # Enrolment draws random ids and the sampler picks positions among the sorted ids, so the
        # i-th workspace takes the i-th smallest id: every method then samples the same clients.
        identities = [DeviceIdentity.generate() for _ in workspaces]
        enrolled = [
            (
                *coordinator.enroll(store.issue_token(f"client {i}"), f"client {i}", identity.public_key),
                identity,
            )
            for i, identity in enumerate(identities)
        ]
        enrolled.sort(key=lambda entry: entry[0])
        sessions = [(client_id, session) for client_id, session, _ in enrolled]
        client_ids = [client_id for client_id, _ in sessions]
        clients = {cid: CLIENT_METHODS[method](ws) for cid, ws in zip(client_ids, workspaces, strict=True)}
        driver = _Driver(coordinator)
        driver.start()
        uploads = SecureUploads(coordinator, {client_id: identity for client_id, _, identity in enrolled})
        try:
            _play_clients(
                coordinator, sessions, clients, rules.update_encoding, driver, uploads, on_round, on_upload
            )
        finally:
            coordinator.stop()
            driver.join()
        if driver.error is not None:
            raise driver.error
        served = served_accuracies(coordinator, workspaces, client_ids) if classify else []
        return FederatedRun(uploads.with_local_reports(store.rounds()), client_ids, served)
    finally:
        store.close()


def _play_clients(
    coordinator: RoundCoordinator,
    sessions: list[tuple[str, str]],
    clients: dict[str, ClientMethod],
    update_encoding: str,
    driver: _Driver,
    uploads: SecureUploads,
    on_round: Callable[[int], None] | None,
    on_upload: UploadHook | None = None,
) -> None:
    """Poll as the devices do until the run is finished: train when told to, else wait briefly."""
    settings = json.loads(coordinator.client_settings_json)
    reported = coordinator.committed
    while not coordinator.finished:
        if not driver.is_alive():
            raise driver.error or RuntimeError("the in-process aggregator stopped before the run finished")
        uploads.check()
        trained = False
        for client_id, session in sessions:
            coordinator.authenticate(session)  # a poll: keeps the client live, as over gRPC
            if uploads.busy(client_id):
                continue
            task = coordinator.next_task(client_id)
            if task.status != "train":
                continue
            round_task = RoundTask(
                coordinator.run_id,
                task.round_id,
                coordinator.config.method.name,
                settings,
                decode_tensor_set(task.payload),
                task.deadline_unix,
            )
            result = clients[client_id].run_round(round_task)
            payload = encode_tensor_set(result.tensors, update_encoding)
            trained = True
            if on_upload is not None:
                index = next(i for i, (cid, _) in enumerate(sessions) if cid == client_id)
                on_upload(index, task.round_id, round_task.tensors, decode_tensor_set(payload))
            if task.secure is not None:
                uploads.start(client_id, task, decode_tensor_set(payload), result)
                continue
            coordinator.submit(
                client_id,
                coordinator.run_id,
                task.round_id,
                result.num_examples,
                _as_wire_map(result.metrics),
                _as_wire_map(result.privacy),
                payload,
            )
        reported = _report_commits(coordinator, reported, on_round)
        if not trained:
            time.sleep(IDLE_POLL_S)
    _report_commits(coordinator, reported, on_round)


def _as_wire_map(values: dict[str, float]) -> dict[str, float]:
    """Metrics and privacy reports as the wire carries them: a map of doubles."""
    return {key: float(value) for key, value in values.items()}


def _report_commits(
    coordinator: RoundCoordinator, reported: int, on_round: Callable[[int], None] | None
) -> int:
    """Call `on_round` for every round committed since `reported`; returns the last one."""
    committed = coordinator.committed
    if on_round is not None:
        for round_id in range(reported + 1, committed + 1):
            on_round(round_id)
    return committed
