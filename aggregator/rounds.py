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
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.secure_rounds import (
    SecureRounds,
    SecureSession,
    StepRefused,
    decoded_weight_total,
    expected_layout,
)
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
from aggregator.validation import ReportError, check_examples, check_metrics, check_privacy, printable
from fedprompt.common.codec import CodecError, decode_tensor_set, encode_tensor_set
from fedprompt.common.privacy_labels import describe_epsilon
from fedprompt.common.secure_round import SecureRoundParams, StepReply

log = logging.getLogger("fedprompt.aggregator")
RETRY_CAP_S = 60.0
"""Longest wait before a round whose aggregation or commit failed is played again."""
REVOCATION_CHECK_S = 1.0
"""How often an open round looks for revoked tokens among its clients."""


class Refused(Exception):
    """A request the aggregator turns down; becomes a gRPC status with this code and message.
    `final`: nothing this client could send would be accepted by the run (told to the client in
    trailing metadata, so that it stops instead of trying round after round)."""

    def __init__(self, code: grpc.StatusCode, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.final = final


@dataclass(frozen=True)
class Task:
    """The answer to a poll: train (with a payload), wait, or stop."""

    status: str  # "train" | "wait" | "finished"
    retry_after_s: float = 0.0
    round_id: int = 0
    deadline_unix: float = 0.0
    payload: bytes = b""
    secure: SecureRoundParams | None = None  # set: the update is securely summed (SecAggStep)

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
    silent: set[str] = field(default_factory=set)  # sampled clients no longer waited for
    refused: set[str] = field(
        default_factory=set
    )  # sampled clients not waited for: update refused, or task declined
    secure: SecureSession | None = None  # the current secure-aggregation attempt, if any
    attempts: int = 0  # secure-aggregation attempts started (not persisted: a restart starts afresh)

    def persisted(self) -> OpenRoundState:
        return OpenRoundState(
            self.round_id, sorted(self.sampled), self.deadline_unix, self.extensions, self.started_at
        )


def _listed(shapes: dict[str, tuple[int, ...]], most: int = 8) -> str:
    """Names and shapes for a refusal line, bounded (an update may carry any number of names)."""
    items = [f"{name[:64]!r}: {shape}" for name, shape in sorted(shapes.items())[:most]]
    more = f", ... {len(shapes) - most} more" if len(shapes) > most else ""
    return "{" + ", ".join(items) + more + "}"


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
        settings = config.settings
        self.settings_json = json.dumps(settings.identity(), sort_keys=True)  # the run's identity
        self.client_settings_json = json.dumps(settings.task.to_dict(), sort_keys=True)  # what tasks carry
        dims = config.bundle_dims()
        self.bundle_digest = dims.digest
        self.update_shapes = settings.spec.expected_update(settings.task, dims)  # fixed for the run
        aggregation = config.aggregation
        combiner = UpdateCombiner(aggregation.rule, aggregation.trim_fraction, aggregation.norm_bound)
        self.strategy = SERVER_STRATEGIES[config.method.name](settings, combiner=combiner)
        self.secure = SecureRounds(config, self.strategy) if config.secure_aggregation.enabled else None
        state = settings.spec.initial_state(settings.task, dims)
        initial = RoundRecord(0, state, self.strategy.state_dict())
        self.run_id = store.open_run(config.method.name, self.settings_json, dims.digest, initial).run_id
        self._cond = threading.Condition()
        self._last_seen: dict[str, float] = {}
        self._stopping = False
        self._round: OpenRound | None = None
        self._summed: SecureSession | None = None  # the last summed session: tells its clients "done"
        self.on_commit: list[Callable[[RoundRecord], None]] = []  # called after each commit (metrics)
        self._load()

    def _load(self) -> None:
        """Take up the stored run where it is: at start, and after a round failed to commit (the
        failed attempt may have changed the strategy's state; the store has the committed one)."""
        latest = self.store.latest_round()
        self.strategy.load_state_dict(latest.strategy_state)
        with self._cond:
            self.global_state = latest.tensors
            self.committed = latest.round_id
            self._closed_through = self.committed  # the last round that takes no more updates
        self._resumed = self._restore_open_round()

    # ---- called by the gRPC handlers -------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.committed >= self.rules.rounds

    def live_count(self) -> int:
        with self._cond:
            return len(self._live())

    @property
    def open_round_id(self) -> int:
        current = self._round
        return 0 if current is None else current.round_id

    def enroll(self, token: str, name: str, device_key: bytes = b"") -> tuple[str, str]:
        name = printable(name)  # kept and logged: no control characters, bounded
        try:
            client_id, session = self.store.enroll(token, name, device_key)
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
            secure = None
            if self.secure is not None:
                session = current.secure
                if session is None or session.failure or session.has_begun(client_id):
                    return Task("wait", retry_after_s=self.rules.poll_interval_s)
                secure = session.params(client_id)
            payload = self._task_payload(current, client_id)
            return Task("train", 0.0, current.round_id, current.deadline_unix, payload, secure)

    def _task_payload(self, current: OpenRound, client_id: str) -> bytes:
        """What this client is sent for the round; also what it is counted to have downloaded when
        its update arrives without a pull (a client resending after a restart of the daemon)."""
        if client_id not in current.payloads:
            tensors = self.strategy.tensors_for_client(self.global_state, client_id)
            current.payloads[client_id] = encode_tensor_set(tensors, self.config.server.task_encoding)
        return current.payloads[client_id]

    def decline(self, client_id: str, run_id: str, round_id: int, reason: str) -> None:
        """A device refused the round's task under its own privacy policy: log its one line and stop
        waiting for it in this round, as for a refused update (the round goes on with the others)."""
        reason = printable(reason, 300) if reason else "no reason given"
        with self._cond:
            current = self._round
            if run_id != self.run_id or current is None or round_id != current.round_id:
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION, f"round {round_id} of {run_id!r} is not open"
                )
            if client_id not in current.sampled or client_id in current.accepted:
                raise Refused(
                    grpc.StatusCode.FAILED_PRECONDITION, f"not waiting for a task of round {round_id}"
                )
        log.warning("round %d: %s refused the task under its privacy policy: %s", round_id, client_id, reason)
        self._not_waiting_for(client_id, round_id, "which declined the task")

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
        """Accept one update, durably, or raise Refused saying why not. A sampled client whose
        update is refused as invalid is no longer waited for (its device sits the round out
        rather than train again); a valid update from it is still taken."""
        try:
            self._submit(client_id, run_id, round_id, num_examples, metrics, privacy, payload, method)
        except Refused as refusal:
            if refusal.code == grpc.StatusCode.INVALID_ARGUMENT:
                self._not_waiting_for(client_id, round_id, "whose update was refused")
            raise

    def _not_waiting_for(self, client_id: str, round_id: int, reason: str) -> None:
        with self._cond:
            current = self._round
            if current is None or current.round_id != round_id or client_id not in current.sampled:
                return
            if client_id not in current.refused and client_id not in current.accepted:
                current.refused.add(client_id)
                log.info("round %d: not waiting for %s, %s", round_id, client_id, reason)
                self._cond.notify_all()

    def _submit(
        self,
        client_id: str,
        run_id: str,
        round_id: int,
        num_examples: int,
        metrics: dict[str, float],
        privacy: dict[str, float],
        payload: bytes,
        method: str,
    ) -> None:
        if run_id != self.run_id:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"update for run {printable(run_id)!r}, this is {self.run_id}",
            )
        if self.secure is not None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this run aggregates securely: updates go through SecAggStep, not PushUpdate",
            )
        if method and method != self.config.method.name:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"update for method {printable(method)!r}, this run uses {self.config.method.name!r}",
                final=True,
            )
        try:
            check_examples(num_examples, self.config.server.max_examples)
            metrics = check_metrics(metrics, self.strategy.extra_metrics)
            privacy = check_privacy(privacy)
        except ReportError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
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
            shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
            if shapes != self.update_shapes:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"update tensors {_listed(shapes)} do not match this run's {_listed(self.update_shapes)}",
                )
            self._check_norm(tensors)
            bytes_down = len(self._task_payload(current, client_id))
            pending = PendingUpdate(client_id, num_examples, metrics, privacy, payload, bytes_down)
            self.store.add_pending_update(round_id, pending)  # before the client hears "accepted"
            current.accepted[client_id] = self._accepted(pending, tensors)
            self._cond.notify_all()
        log.info("round %d: update from %s (%d examples)", round_id, client_id, num_examples)

    def secure_step(
        self,
        client_id: str,
        run_id: str,
        round_id: int,
        session_id: bytes,
        step: int,
        message: bytes,
        layout: list[tuple[str, tuple[int, ...]]],
        privacy: dict[str, float],
    ) -> StepReply:
        """One step of the round's secure aggregation (`aggregator.secure_rounds`)."""
        if run_id != self.run_id:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"step for run {printable(run_id)!r}, this is {self.run_id}",
            )
        try:
            privacy = check_privacy(privacy)
        except ReportError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        with self._cond:
            if self.secure is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this run does not aggregate securely")
            current = self._round
            session = None if current is None or current.round_id != round_id else current.secure
            if session is None or session.session_id != session_id:
                session = self._summed
            if session is None or session.session_id != session_id:
                reason = f"round {round_id} has no such session (closed or restarted)"
                return StepReply("aborted", reason=reason)
            try:
                reply = session.handle(client_id, step, message, layout, privacy, self._live(), time.time())
            except StepRefused as refusal:
                raise Refused(refusal.code, refusal.message) from None
            self._cond.notify_all()
            return reply

    def served_model(self, client_id: str) -> tuple[int, bytes]:
        """The last committed round and what it serves `client_id`: the global state plus the
        method's per-client extras (pFedMoAP's experts), as a task of the next round would."""
        with self._cond:
            served = self.strategy.tensors_for_client(self.global_state, client_id)
            return self.committed, encode_tensor_set(served, self.config.server.task_encoding)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- the driver thread -----------------------------------------------------------------

    def run(self, retry_failures: bool = True) -> None:
        """Plays rounds until the configured number is committed or `stop` is called. A round
        whose aggregation or commit fails ends neither the run nor the daemon: it is logged in one
        line and, after a backoff, taken up again from the store as after a crash (its accepted
        updates kept, the strategy state the last committed one). Without `retry_failures` (the
        in-process harness, where a failure is a bug to show) the error propagates."""
        if self.committed:
            log.info("resuming run %s after committed round %d", self.run_id, self.committed)
        failures = 0
        while not self.finished:
            try:
                if failures:
                    self._load()
                if not self._play_next_round():
                    return
                failures = 0
            except Exception as error:
                if not retry_failures:
                    raise
                failures += 1
                delay = min(RETRY_CAP_S, 2.0**failures)
                log.error(
                    "round %d failed (%s: %s); playing it again with its updates in %.0f s",
                    self.committed + 1,
                    type(error).__name__,
                    printable(str(error), 200),
                    delay,
                )
                log.debug("round failure", exc_info=True)
                with self._cond:
                    if self._cond.wait_for(lambda: self._stopping, timeout=delay):
                        return
        log.info(
            "run %s finished after %d rounds; serving the final model until stopped",
            self.run_id,
            self.committed,
        )

    def _play_next_round(self) -> bool:
        """Opens (or resumes) the next round, plays it and commits it; False when stopped."""
        current, self._resumed = self._resumed, None
        if current is None:
            if not self._wait_for_clients():
                return False
            current = self._open_round(self.committed + 1)
        record = self._play_round(current)
        if record is None:
            return False
        self.store.commit_round(record)
        with self._cond:
            self.global_state, self.committed = record.tensors, record.round_id
            self._cond.notify_all()
        self._log_round(record)
        for listener in self.on_commit:
            listener(record)
        return True

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
            revocations_due = 0.0
            while not self._stopping:
                if time.monotonic() >= revocations_due:  # a revoked client is not waited for
                    self._drop_revoked(current)
                    revocations_due = time.monotonic() + REVOCATION_CHECK_S
                if self.secure is not None:
                    if self._secure_sum_ready(current):
                        break
                    self._cond.wait(timeout=0.2)
                    continue
                live = self._live()
                outstanding = current.sampled - set(current.accepted) - current.refused
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
        if current.secure is not None:
            return self._aggregate_secure(current, current.secure)
        return self._aggregate(current, accepted)

    def _secure_sum_ready(self, current: OpenRound) -> bool:
        """Advances the round's secure aggregation; True once it holds a usable sum, which its
        members are then told. A failed attempt (too many dropouts, too few clients summed, a
        revoked survivor) is logged and replaced by a new one with fresh keys; members whose
        masked input went out bring a freshly trained update to it."""
        live = self._live()
        self._note_silent(current, current.sampled - live)
        live -= current.refused  # a device that declined the task takes no part in the session
        session = current.secure
        if session is not None and session.failure is None:
            session.advance(live, time.time())
            unusable = session.failure is None and session.result is not None
            unusable = unusable and self._unusable_sum(current, session.survivors)
            if unusable:  # revoked while unmasking: the sum is dropped, its inputs are spent
                session.fail(f"{unusable}; the sum was discarded, its members train afresh")
            if session.failure is None and session.result is not None:
                session.accept()
                self._summed = session
                return True
            if session.failure is None:
                return False
        if session is not None and not session.failure_logged:
            session.failure_logged = True
            round_id, attempt, failure = current.round_id, current.attempts, session.failure
            log.warning("round %d: secure aggregation attempt %d failed: %s", round_id, attempt, failure)
        self._start_secure_attempt(current, live)
        return False

    def _unusable_sum(self, current: OpenRound, survivors: list[str]) -> str | None:
        """Why a sum of these survivors could not be committed: checked before the unmask request
        (so no sum is recovered and then discarded) and again once the sum is in."""
        if len(survivors) < self.rules.min_updates:
            return f"only {len(survivors)} clients would be summed, fewer than rounds.min_updates"
        revoked = self.store.revoked_clients(survivors)
        if revoked:
            current.sampled -= revoked
            return f"the sum includes {', '.join(sorted(revoked))}, whose token was revoked"
        return None

    def _start_secure_attempt(self, current: OpenRound, live: set[str]) -> None:
        """The first attempt takes the round's sample; a later one the sampled clients still live,
        topped up with freshly sampled live clients, and a new deadline."""
        threshold = self.config.secure_aggregation.threshold
        members = set(current.sampled) if not current.attempts else current.sampled & live
        if current.attempts:
            wanted = max(self.rules.min_fit, threshold + 1) - len(members)
            draw = current.extensions + 1
            fresh = self._sample(live - current.sampled, max(wanted, 0), current.round_id, draw)
            if len(members | fresh) <= threshold:
                return  # polled again every 0.2 s until enough clients are live
            current.sampled |= fresh
            members |= fresh
            current.extensions += 1
            current.deadline_unix = time.time() + self.rules.round_timeout_s
            self.store.save_open_round(current.persisted())
        current.attempts += 1
        layout = expected_layout(self.update_shapes)
        current.secure = self.secure.start(
            self.run_id,
            current.round_id,
            current.attempts,
            members,
            current.deadline_unix,
            layout,
            self.store.device_keys(sorted(members)),
            lambda survivors: self._unusable_sum(current, survivors),
        )
        log.info(
            "round %d: secure aggregation attempt %d with %d clients (threshold %d)",
            current.round_id,
            current.attempts,
            len(members),
            current.secure.threshold,
        )
        self._cond.notify_all()

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
        for client in sorted(revoked):
            if current.accepted.pop(client, None) is not None:
                log.warning(
                    "round %d: dropping the update of %s, whose token was revoked", current.round_id, client
                )
            else:
                log.warning("round %d: %s's token was revoked; not waiting for it", current.round_id, client)
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
        examples = sum(c.num_examples for c in clients)
        return self._record(current, tensors, strategy_metrics, clients, _weighted_means(accepted), examples)

    def _aggregate_secure(self, current: OpenRound, session: SecureSession) -> RoundRecord:
        """The round from its secure sum: per survivor only its privacy report and traffic."""
        survivors = len(session.survivors)
        log.info("round %d: aggregating the secure sum of %d clients", current.round_id, survivors)
        tensors, strategy_metrics = self.strategy.aggregate_sum(self.global_state, session.result)
        clients = [
            ClientRoundRecord(
                client,
                0,  # a secure round never learns a client's example count
                {},
                session.privacy.get(client, {}),
                session.bytes_up[client],
                session.bytes_down[client] + len(current.payloads.get(client, b"")),
            )
            for client in session.survivors
        ]
        examples = decoded_weight_total(session.result, session.example_cap)
        record = self._record(current, tensors, strategy_metrics, clients, session.result.metrics, examples)
        record.metrics["secure_aggregation"] = {**session.summary(), "attempts": current.attempts}
        return record

    def _record(
        self,
        current: OpenRound,
        tensors: dict[str, np.ndarray],
        strategy_metrics: dict[str, float],
        clients: list[ClientRoundRecord],
        client_metrics: dict[str, float],
        num_examples: int,
    ) -> RoundRecord:
        epsilons = [c.privacy["epsilon"] for c in clients if "epsilon" in c.privacy]
        deltas = [c.privacy["delta"] for c in clients if "delta" in c.privacy]
        metrics = {
            "clients": sorted(c.client_id for c in clients),
            "num_examples": num_examples,
            "client_metrics": client_metrics,
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
            "up %.1f KB/client, down %.1f KB/client, %s, %.1f s",
            record.round_id,
            self.rules.rounds,
            len(m["clients"]),
            m["num_examples"],
            "n/a" if accuracy is None else f"{accuracy:.3f}",
            m["bytes_up_per_client"] / 1024,
            m["bytes_down_per_client"] / 1024,
            self._epsilon_text(m["epsilon_max"], m["delta"]),
            m["duration_s"],
        )
        global_epsilon = m["strategy"].get("global_epsilon")
        if global_epsilon is not None:
            log.info(
                "round %d/%d server-side global DP: %s",
                record.round_id,
                self.rules.rounds,
                describe_epsilon(
                    global_epsilon,
                    m["strategy"]["global_delta"],
                    "global",
                    self.config.settings.core.accountant,
                ),
            )

    def _epsilon_text(self, epsilon: float | None, delta: float | None) -> str:
        """The devices' largest reported epsilon, named by the run's DP mode and accountant."""
        training = self.config.settings.core
        if epsilon is None or delta is None:
            return "epsilon n/a"
        if training.dp == "none":  # reported although the run asks for no DP: shown, not named
            return f"epsilon {epsilon:.3g} (delta {delta:.0e})"
        return describe_epsilon(epsilon, delta, training.dp, training.accountant)
