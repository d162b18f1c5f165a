"""Round scheduling: who is live, who is sampled, which updates are accepted, when a round closes.

The gRPC handlers call `RoundCoordinator` from many threads; one driver thread (`run`) plays the
rounds. All shared state sits behind one condition variable. The open round (its sample, deadline
and every accepted update) is in the store before a client hears "accepted", and a round is
aggregated and committed in one transaction before the next one opens: a restarted daemon resumes
the open round where it was, and no update is lost or applied twice.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.store import (
    AuthError,
    ClientRoundRecord,
    OpenRoundState,
    PendingUpdate,
    RoundRecord,
    Store,
)
from aggregator.strategies.base import ClientUpdate
from aggregator.strategies.combine import UpdateCombiner, distance
from aggregator.strategies.registry import SERVER_STRATEGIES
from fedprompt.common.codec import CodecError, decode_tensor_set, encode_tensor_set

log = logging.getLogger("fedprompt.aggregator")
MAX_EXAMPLES = 2**31 - 1
"""Largest example count an update may claim (it is stored as an SQLite integer and used as a weight)."""


class Refused(Exception):
    """A request the aggregator turns down; becomes a gRPC status with this code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Task:
    """The answer to a poll: train (with a payload), wait, or stop."""

    status: str  # "train" | "wait" | "finished"
    retry_after_s: float = 0.0
    round_id: int = 0
    deadline_unix: float = 0.0
    payload: bytes = b""

    @property
    def deadline_in_s(self) -> float:
        return max(0.0, self.deadline_unix - time.time()) if self.deadline_unix else 0.0


@dataclass
class Accepted:
    update: ClientUpdate
    privacy: dict[str, float]
    bytes_up: int
    bytes_down: int


@dataclass
class OpenRound:
    round_id: int
    sampled: set[str]
    deadline_unix: float
    started_at: float = field(default_factory=time.time)
    extensions: int = 0
    payloads: dict[str, bytes] = field(default_factory=dict)
    accepted: dict[str, Accepted] = field(default_factory=dict)
    spec: dict[str, tuple[int, ...]] | None = None
    silent: set[str] = field(default_factory=set)  # sampled clients no longer waited for

    def persisted(self) -> OpenRoundState:
        return OpenRoundState(
            self.round_id, sorted(self.sampled), self.deadline_unix, self.extensions, self.started_at
        )


def _finite_map(values: dict[str, float], what: str) -> dict[str, float]:
    if not all(math.isfinite(v) for v in values.values()):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what} contain NaN or Inf")
    return dict(values)


def _weighted_means(accepted: list[Accepted]) -> dict[str, float]:
    """Example-weighted mean of every metric key, over the clients that reported it."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for item in accepted:
        for key, value in item.update.metrics.items():
            sums[key] = sums.get(key, 0.0) + value * item.update.num_examples
            weights[key] = weights.get(key, 0) + item.update.num_examples
    return {key: sums[key] / weights[key] for key in sums}


class RoundCoordinator:
    """The aggregator's state machine between the gRPC handlers and the store."""

    def __init__(self, store: Store, config: AggregatorConfig) -> None:
        self.store = store
        self.config = config
        self.rules = config.rounds
        settings = config.training.to_dict()
        self.settings_json = json.dumps(settings, sort_keys=True)
        aggregation = config.aggregation
        combiner = UpdateCombiner(aggregation.rule, aggregation.trim_fraction, aggregation.norm_bound)
        self.strategy = SERVER_STRATEGIES[config.method.name](settings, combiner=combiner)
        initial = RoundRecord(0, self.strategy.initial_state(), self.strategy.state_dict())
        self.run_id = store.open_run(config.method.name, self.settings_json, initial).run_id
        latest = store.latest_round()
        self.strategy.load_state_dict(latest.strategy_state)
        self.global_state = latest.tensors
        self.committed = latest.round_id
        self._closed_through = self.committed  # the last round that takes no more updates
        self._cond = threading.Condition()
        self._last_seen: dict[str, float] = {}
        self._stopping = False
        self._round: OpenRound | None = None
        self._resumed = self._restore_open_round()

    # ---- called by the gRPC handlers -------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.committed >= self.rules.rounds

    def enroll(self, token: str, name: str) -> tuple[str, str]:
        try:
            client_id, session = self.store.enroll(token, name)
        except AuthError as error:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, str(error)) from None
        self._touch(client_id)
        log.info("client %s enrolled (%s)", client_id, name or "unnamed")
        return client_id, session

    def authenticate(self, session: str) -> str:
        client_id = self.store.client_for_session(session) if session else None
        if client_id is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown or revoked session; enrol again")
        self._touch(client_id)
        return client_id

    def heartbeat(self, client_id: str, round_id: int) -> tuple[bool, float]:
        """Whether the round this client works on is still open for its update, and the seconds
        left until its deadline (0 when closed)."""
        with self._cond:
            current = self._round
            if current is None or current.round_id != round_id or client_id not in current.sampled:
                return False, 0.0
            return True, max(0.0, current.deadline_unix - time.time())

    def next_task(self, client_id: str) -> Task:
        with self._cond:
            if self.finished:
                return Task("finished")
            current = self._round
            if current is None or client_id not in current.sampled or client_id in current.accepted:
                return Task("wait", retry_after_s=self.rules.poll_interval_s)
            if client_id not in current.payloads:
                tensors = self.strategy.tensors_for_client(self.global_state, client_id)
                current.payloads[client_id] = encode_tensor_set(tensors, self.config.server.task_encoding)
            return Task("train", 0.0, current.round_id, current.deadline_unix, current.payloads[client_id])

    def submit(
        self,
        client_id: str,
        run_id: str,
        round_id: int,
        num_examples: int,
        metrics: dict[str, float],
        privacy: dict[str, float],
        payload: bytes,
        method: str = "",
    ) -> None:
        """Accept one update, durably, or raise Refused saying why not."""
        if run_id != self.run_id:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION, f"update for run {run_id!r}, this is {self.run_id}"
            )
        if method and method != self.config.method.name:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"update for method {method[:64]!r}, this run uses {self.config.method.name!r}",
            )
        if not 1 <= num_examples <= MAX_EXAMPLES:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"num_examples must be in 1..{MAX_EXAMPLES}")
        metrics, privacy = _finite_map(metrics, "metrics"), _finite_map(privacy, "privacy values")
        try:
            tensors = decode_tensor_set(payload)
        except CodecError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        with self._cond:
            current = self._round
            if current is None or round_id != current.round_id:
                state = "closed" if round_id <= self._closed_through else "not open"
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"round {round_id} is {state}")
            if client_id not in current.sampled:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"not sampled for round {round_id}")
            if client_id in current.accepted:
                raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"update for round {round_id} already received")
            shapes = {name: tensor.shape for name, tensor in tensors.items()}
            spec = current.spec or self.strategy.update_spec(self.global_state)
            if spec is not None and shapes != spec:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT, f"update tensors {shapes} do not match {spec}"
                )
            self._check_norm(tensors)
            bytes_down = len(current.payloads.get(client_id, b""))
            pending = PendingUpdate(client_id, num_examples, metrics, privacy, payload, bytes_down)
            self.store.add_pending_update(round_id, pending)  # before the client hears "accepted"
            current.spec = shapes
            current.accepted[client_id] = self._accepted(pending, tensors)
            self._cond.notify_all()
        log.info("round %d: update from %s (%d examples)", round_id, client_id, num_examples)

    def global_model(self) -> tuple[int, bytes]:
        with self._cond:
            return self.committed, encode_tensor_set(self.global_state, self.config.server.task_encoding)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- the driver thread -----------------------------------------------------------------

    def run(self) -> None:
        """Plays rounds until the configured number is committed or `stop` is called."""
        if self.committed:
            log.info("resuming run %s after committed round %d", self.run_id, self.committed)
        while not self.finished:
            current, self._resumed = self._resumed, None
            if current is None:
                if not self._wait_for_clients():
                    return
                current = self._open_round(self.committed + 1)
            record = self._play_round(current)
            if record is None:
                return
            self.store.commit_round(record)
            with self._cond:
                self.global_state, self.committed = record.tensors, record.round_id
                self._cond.notify_all()
            self._log_round(record)
        log.info(
            "run %s finished after %d rounds; serving the final model until stopped",
            self.run_id,
            self.committed,
        )

    def _accepted(self, pending: PendingUpdate, tensors: dict[str, np.ndarray]) -> Accepted:
        update = ClientUpdate(pending.client_id, tensors, pending.num_examples, pending.metrics)
        return Accepted(update, pending.privacy, len(pending.payload), pending.bytes_down)

    def _check_norm(self, tensors: dict[str, np.ndarray]) -> None:
        bound = self.config.aggregation.max_update_norm
        if not bound:
            return
        far = distance(tensors, self.strategy.update_reference(self.global_state))
        if far > bound:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"update is {far:.4g} away from the global model, above max_update_norm {bound:g}",
            )

    def _restore_open_round(self) -> OpenRound | None:
        """The round a crashed daemon left open, with the updates it had accepted. Its sampled
        clients count as live from now, and the deadline leaves them client_timeout_s to return."""
        state = self.store.open_round()
        if state is None:
            return None
        now = time.time()
        current = OpenRound(
            state.round_id,
            set(state.sampled),
            max(state.deadline_unix, now + self.rules.client_timeout_s),
            state.started_at,
            state.extensions,
        )
        for pending in state.updates:
            tensors = decode_tensor_set(pending.payload)
            current.accepted[pending.client_id] = self._accepted(pending, tensors)
            current.spec = {name: tensor.shape for name, tensor in tensors.items()}
        self.store.save_open_round(current.persisted())
        self._last_seen.update((client, time.monotonic()) for client in current.sampled)
        log.info(
            "resuming open round %d with %d accepted update(s), deadline in %.0f s",
            current.round_id,
            len(current.accepted),
            current.deadline_unix - now,
        )
        return current

    def _touch(self, client_id: str) -> None:
        with self._cond:
            self._last_seen[client_id] = time.monotonic()
            self._cond.notify_all()

    def _live(self) -> set[str]:
        horizon = time.monotonic() - self.rules.client_timeout_s
        return {client for client, seen in self._last_seen.items() if seen >= horizon}

    def _wait_for_clients(self) -> bool:
        with self._cond:
            if len(self._live()) < self.rules.min_clients:
                log.info("waiting for %d live clients (%d now)", self.rules.min_clients, len(self._live()))
            while not self._stopping and len(self._live()) < self.rules.min_clients:
                self._cond.wait(timeout=1.0)
            return not self._stopping

    def _sample(self, candidates: set[str], count: int, round_id: int, draw: int) -> set[str]:
        """A seeded sample; the seed depends on the round and the draw, not on the daemon's past,
        so a restarted daemon samples as the original would have."""
        chooser = random.Random(f"{self.rules.seed}:{round_id}:{draw}")
        return set(chooser.sample(sorted(candidates), min(count, len(candidates))))

    def _open_round(self, round_id: int) -> OpenRound:
        with self._cond:
            live = self._live()
            target = max(self.rules.min_fit, math.ceil(self.rules.fraction * len(live)))
            current = OpenRound(
                round_id, self._sample(live, target, round_id, 0), time.time() + self.rules.round_timeout_s
            )
        self.store.save_open_round(current.persisted())
        log.info("round %d/%d: sampled %s", round_id, self.rules.rounds, ", ".join(sorted(current.sampled)))
        return current

    def _play_round(self, current: OpenRound) -> RoundRecord | None:
        """Publishes the round, waits for it to be decided, closes it and aggregates it."""
        with self._cond:
            self._round = current
            self._cond.notify_all()
            while not self._stopping:
                live = self._live()
                outstanding = current.sampled - set(current.accepted)
                self._note_silent(current, outstanding - live)
                waiting_on = outstanding & live
                expired = time.time() >= current.deadline_unix
                if (not waiting_on or expired) and len(current.accepted) >= self.rules.min_updates:
                    if not self._drop_revoked(current):
                        break
                    continue
                if expired or not waiting_on:
                    self._extend(current, live, expired)
                self._cond.wait(timeout=max(0.05, min(1.0, current.deadline_unix - time.time())))
            self._round = None
            self._closed_through = current.round_id
            if self._stopping:
                return None
            accepted = list(current.accepted.values())
        return self._aggregate(current, accepted)

    def _note_silent(self, current: OpenRound, silent: set[str]) -> None:
        for client in sorted(silent - current.silent):
            log.info(
                "round %d: %s silent for over %.0f s; not waiting for it",
                current.round_id,
                client,
                self.rules.client_timeout_s,
            )
        current.silent |= silent

    def _drop_revoked(self, current: OpenRound) -> bool:
        """Removes the updates (and the places) of clients revoked since they were accepted, so that
        revoking a compromised device also keeps its uncommitted update out; True if any was."""
        revoked = self.store.revoked_clients(sorted(current.sampled))
        for client in sorted(revoked & set(current.accepted)):
            log.warning(
                "round %d: dropping the update of %s, whose token was revoked", current.round_id, client
            )
            del current.accepted[client]
        current.sampled -= revoked
        return bool(revoked)

    def _extend(self, current: OpenRound, live: set[str], expired: bool) -> None:
        """Too few updates and nobody left to wait for (or the deadline passed): sample more live
        clients and move the deadline, keeping the updates received."""
        wanted = self.rules.min_updates - len(current.accepted)
        fresh = self._sample(live - current.sampled, wanted, current.round_id, current.extensions + 1)
        if not fresh and not expired:
            return
        current.sampled |= fresh
        current.deadline_unix = time.time() + self.rules.round_timeout_s
        current.extensions += 1
        self.store.save_open_round(current.persisted())
        log.info(
            "round %d: %d of %d required updates; extended (added %s), new deadline in %.0f s",
            current.round_id,
            len(current.accepted),
            self.rules.min_updates,
            ", ".join(sorted(fresh)) or "nobody",
            self.rules.round_timeout_s,
        )

    def _aggregate(self, current: OpenRound, accepted: list[Accepted]) -> RoundRecord:
        log.info("round %d: aggregating %d updates", current.round_id, len(accepted))
        updates = [item.update for item in accepted]
        tensors, strategy_metrics = self.strategy.aggregate(self.global_state, updates)
        clients = [
            ClientRoundRecord(
                item.update.client_id,
                item.update.num_examples,
                item.update.metrics,
                item.privacy,
                item.bytes_up,
                item.bytes_down,
            )
            for item in accepted
        ]
        epsilons = [item.privacy["epsilon"] for item in accepted if "epsilon" in item.privacy]
        deltas = [item.privacy["delta"] for item in accepted if "delta" in item.privacy]
        metrics = {
            "clients": sorted(c.client_id for c in clients),
            "num_examples": sum(c.num_examples for c in clients),
            "client_metrics": _weighted_means(accepted),
            "bytes_up_per_client": float(np.mean([c.bytes_up for c in clients])),
            "bytes_down_per_client": float(np.mean([c.bytes_down for c in clients])),
            "epsilon_max": max(epsilons) if epsilons else None,
            "delta": max(deltas) if deltas else None,
            "strategy": strategy_metrics,
            "extensions": current.extensions,
            "sampled": len(current.sampled),
            "duration_s": time.time() - current.started_at,
        }
        return RoundRecord(current.round_id, tensors, self.strategy.state_dict(), metrics, clients)

    def _log_round(self, record: RoundRecord) -> None:
        m = record.metrics
        accuracy = m["client_metrics"].get("accuracy")
        log.info(
            "round %d/%d committed: %d clients, %d examples, mean local accuracy %s, "
            "up %.1f KB/client, down %.1f KB/client, epsilon %s, %.1f s",
            record.round_id,
            self.rules.rounds,
            len(m["clients"]),
            m["num_examples"],
            "n/a" if accuracy is None else f"{accuracy:.3f}",
            m["bytes_up_per_client"] / 1024,
            m["bytes_down_per_client"] / 1024,
            "n/a" if m["epsilon_max"] is None else f"{m['epsilon_max']:.3g} (delta {m['delta']:.0e})",
            m["duration_s"],
        )
