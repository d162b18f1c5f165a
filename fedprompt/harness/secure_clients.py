"""The in-process harness's devices in securely aggregated rounds.

Each trained client takes part in the round's secure-aggregation session in a thread of its own
(the session needs every member to answer each step before the next opens), through the same
`edge_client.secure_upload` as a device, with the coordinator's `secure_step` in place of gRPC:
the same message bytes, counted by the coordinator.

The aggregator of a secure round stores no per-client metric. The harness plays the devices, so it
keeps what each one reported locally (example count, accuracies, privacy report, a clustering
method's cluster) and puts it in the round's records it returns, for the experiment's rows: the
experimenter sees the devices, the server does not.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from aggregator.config import SecureAggregationConfig
from aggregator.rounds import Refused, RoundCoordinator, Task
from aggregator.store import ClientRoundRecord, RoundRecord
from edge_client.device_identity import PeerPins
from edge_client.methods.base import RoundResult
from edge_client.secure_upload import secure_upload
from fedprompt.common.methods import METHOD_SPECS
from fedprompt.common.secagg.identity import DeviceIdentity
from fedprompt.common.secure_round import StepReply


def secure_rules(method: str, clients: int, fraction: float) -> tuple[SecureAggregationConfig, int]:
    """([secure_aggregation], rounds.min_fit) of an in-process run: off (and min_fit 1) unless the
    method needs it; then the threshold is a majority of the clients sampled per round (so a
    minority colluding with the server learns nothing beyond the sum)."""
    if METHOD_SPECS[method].secure_aggregation != "required":
        return SecureAggregationConfig(), 1
    sampled = math.ceil(fraction * clients)
    if sampled < 4:  # devices take a threshold of 3 at least, and a session needs one more client
        raise ValueError(
            f"{method} is securely aggregated: it needs at least 4 clients per round, not {sampled}"
        )
    threshold = max(3, sampled // 2 + 1)
    return SecureAggregationConfig(enabled=True, threshold=threshold), threshold + 1


class CoordinatorChannel:
    """`edge_client.secure_upload.SecureChannel` over direct calls to the coordinator."""

    def __init__(self, coordinator: RoundCoordinator, client_id: str, task: Task) -> None:
        self.coordinator, self.client_id, self.task = coordinator, client_id, task

    def exchange(
        self,
        step: int,
        message: bytes,
        layout: Sequence[tuple[str, tuple[int, ...]]] = (),
        privacy: Mapping[str, float] | None = None,
    ) -> StepReply:
        privacy = {key: float(value) for key, value in (privacy or {}).items()}
        try:
            return self.coordinator.secure_step(
                self.client_id,
                self.coordinator.run_id,
                self.task.round_id,
                self.task.secure.session_id,
                step,
                message,
                list(layout),
                privacy,
            )
        except Refused as refusal:
            return StepReply("aborted", reason=refusal.message)


class SecureUploads:
    """The running secure uploads of the in-process devices, and what each device reported."""

    def __init__(self, coordinator: RoundCoordinator, identities: Mapping[str, DeviceIdentity]) -> None:
        self.coordinator = coordinator
        self.identities = identities
        self._pins = {client: PeerPins(None) for client in identities}
        self._threads: dict[str, threading.Thread] = {}
        self._errors: list[BaseException] = []
        self._reports: dict[int, dict[str, ClientRoundRecord]] = {}

    def busy(self, client_id: str) -> bool:
        thread = self._threads.get(client_id)
        return thread is not None and thread.is_alive()

    def start(self, client_id: str, task: Task, tensors: dict[str, np.ndarray], result: RoundResult) -> None:
        """Sum `tensors` (the result as encoded for the wire) in the task's session, in a thread."""
        report = ClientRoundRecord(client_id, result.num_examples, dict(result.metrics), dict(result.privacy))
        self._reports.setdefault(task.round_id, {})[client_id] = report
        channel = CoordinatorChannel(self.coordinator, client_id, task)

        def take_part() -> None:
            try:
                secure_upload(
                    task.secure,
                    tensors,
                    result.num_examples,
                    result.metrics,
                    result.privacy,
                    channel,
                    self.identities[client_id],
                    self._pins[client_id],
                )
            except BaseException as error:  # re-raised by `check` in the thread that plays the clients
                self._errors.append(error)

        thread = threading.Thread(target=take_part, name=f"secure-{client_id}", daemon=True)
        self._threads[client_id] = thread
        thread.start()

    def check(self) -> None:
        """Re-raise the first error of a finished upload thread."""
        if self._errors:
            raise self._errors[0]

    def with_local_reports(self, records: list[RoundRecord]) -> list[RoundRecord]:
        """Secure rounds' records with each summed client's own report (and the server's byte counts)."""
        return [
            dataclasses.replace(
                record,
                clients=[
                    dataclasses.replace(
                        self._reports[record.round_id][c.client_id],
                        bytes_up=c.bytes_up,
                        bytes_down=c.bytes_down,
                    )
                    for c in record.clients
                ],
            )
            if record.round_id in self._reports
            else record
            for record in records
        ]
