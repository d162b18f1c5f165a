"""The edge client's network side: enrol, poll for tasks, train through a method's client half,
heartbeat while training, upload the update in chunks, and survive an aggregator that is not up
yet or restarts (exponential backoff with jitter, bounded by `patience_s` of continuous failure).

Local work is never thrown away: the trained update is saved before it is uploaded, an upload cut
off by a restart is retried until the round's deadline, and a saved update is sent (not trained
again) when the same round is offered after a crash of either side. Refusals never cost privacy:
a device whose update is refused keeps it, says why in one line and sits that round out (it
never trains for it again), or stops when the aggregator says the refusal is final.

The runtime knows no method: it turns a task into a `RoundTask`, hands it to the `ClientHalf`
named in the task, and ships back the `RoundResult`: pushed as an update, or, when the task says
the round is securely aggregated, summed with the others' through SecAggStep
(`edge_client.secure_upload`), where it is kept until a session has it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from edge_client.device_identity import PeerPins, device_identity
from edge_client.device_run import save_served, save_task
from edge_client.methods.base import ClientHalf, RoundTask
from edge_client.pending_upload import PendingUpload, PendingUploadFile
from edge_client.privacy_policy import PolicyGuard, PolicyRefusal
from edge_client.secure_upload import GrpcSecureChannel, Outcome, params_from_message, secure_upload
from edge_client.tls import ChannelSecurity, closed_socket_hint, tls_failure
from fedprompt.common.codec import CodecError, decode_tensor_set, encode_tensor_set, iter_chunks, join_chunks
from fedprompt.common.files import write_atomically
from fedprompt.common.methods import TaskSettings
from fedprompt.common.network import REFUSAL_METADATA, session_metadata, token_metadata
from fedprompt.common.privacy_labels import describe_epsilon
from fedprompt.common.secagg.policy import ThresholdFloor
from fedprompt.common.settings import SettingsError
from protos import fedprompt_pb2 as pb
from protos import fedprompt_pb2_grpc as pb_grpc

log = logging.getLogger("fedprompt.client")
T = TypeVar("T")

DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20
"""Until the aggregator announces its limits at enrolment (the aggregator's default too)."""
MAX_MESSAGE_CAP_BYTES = 64 * 2**20
RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,  # e.g. cut by the aggregator's door after a stall on the way
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)
"""Transient failures: the same call (the same saved update) is sent again, with backoff."""
_ENCODING_NAMES = {pb.FP32: "fp32", pb.FP16: "fp16", pb.INT8: "int8"}
PLAINTEXT = ChannelSecurity(None, "plaintext")


class ClientError(RuntimeError):
    """The client cannot go on; the message is one line for the user."""


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),  # the runtime retries itself, with backoff and a bound
    ]


def backoff_delays(base_s: float = 0.5, cap_s: float = 30.0) -> Iterator[float]:
    """Exponential backoff with jitter: the n-th delay is uniform in [d/2, d], d = min(cap, base*2^n),
    so that many clients reconnecting after an aggregator restart do not arrive together."""
    attempt = 0
    while True:
        ceiling = min(cap_s, base_s * 2**attempt)
        yield random.uniform(ceiling / 2, ceiling)
        attempt += 1


class AggregatorLink:
    """A channel to the aggregator whose calls retry transient failures with backoff, and give up
    with one clear line after `patience_s` without any successful call, or at once when the TLS
    handshake fails (retrying cannot fix a certificate)."""

    def __init__(
        self,
        address: str,
        patience_s: float,
        rpc_timeout_s: float = 30.0,
        security: ChannelSecurity = PLAINTEXT,
    ) -> None:
        self.address = address
        self.patience_s = patience_s
        self.rpc_timeout_s = rpc_timeout_s
        self.security = security
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self._open()

    def _open(self) -> None:
        options = channel_options(self.max_message_bytes)
        if self.security.credentials is None:
            self.channel = grpc.insecure_channel(self.address, options=options)
        else:
            self.channel = grpc.secure_channel(self.address, self.security.credentials, options=options)
        self.stub = pb_grpc.AggregatorStub(self.channel)

    def adopt_limits(self, max_message_bytes: int) -> None:
        """Use the message limit the aggregator announced (bounded by a sane cap)."""
        wanted = min(max(max_message_bytes, 1), MAX_MESSAGE_CAP_BYTES)
        if wanted != self.max_message_bytes:
            self.max_message_bytes = wanted
            self.channel.close()
            self._open()

    def call(self, what: str, rpc: Callable[[], T], give_up_at: float | None = None) -> T:
        """Run `rpc` until it succeeds, retrying transient failures until `give_up_at` (monotonic;
        default: `patience_s` from now); other errors propagate."""
        deadline = time.monotonic() + self.patience_s if give_up_at is None else give_up_at
        delays = backoff_delays()
        while True:
            try:
                return rpc()
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                failure = tls_failure(error.details())
                if failure:
                    raise ClientError(f"cannot connect to {self.address}: {failure}") from None
                delay = next(delays)
                if time.monotonic() + delay > deadline:
                    raise ClientError(self._gave_up(what, error.details(), give_up_at is not None)) from None
                log.info("aggregator unavailable (%s); retrying in %.1f s", what, delay)
                time.sleep(delay)

    def _gave_up(self, what: str, details: str, at_round_deadline: bool) -> str:
        if at_round_deadline:
            return f"no answer from {self.address} before the round's deadline ({what}: {details})"
        return (
            f"cannot reach the aggregator at {self.address} ({what}: {details}); "
            f"gave up after {self.patience_s:.0f} s" + closed_socket_hint(self.security, details)
        )

    def close(self) -> None:
        self.channel.close()


@dataclass
class Identity:
    """Who this device is to the aggregator; kept in the state folder so a restart resumes."""

    aggregator: str
    token_id: str
    client_id: str
    session: str
    run_id: str


class Heartbeat:
    """Tells the aggregator every `interval_s` that this client is alive, while it trains, and keeps
    `deadline` (monotonic) up to date when the aggregator extends the round."""

    def __init__(
        self, link: AggregatorLink, session: str, round_id: int, interval_s: float, deadline: float
    ) -> None:
        self._link, self._session, self._round_id, self._interval = link, session, round_id, interval_s
        self.deadline = deadline
        self.round_closed = False
        self._stop = threading.Event()
        name = f"{threading.current_thread().name}-heartbeat"
        self._thread = threading.Thread(target=self._beat, name=name, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                reply = self._link.stub.Heartbeat(
                    pb.HeartbeatRequest(session=self._session, round_id=self._round_id),
                    timeout=self._link.rpc_timeout_s,
                    metadata=session_metadata(self._session),
                )
            except grpc.RpcError as error:
                log.info("heartbeat failed (%s); training goes on", error.code().name)
                continue
            if reply.round_open:
                self.deadline = time.monotonic() + reply.deadline_in_s
            elif not self.round_closed:
                self.round_closed = True
                log.info(
                    "round %d closed while this client trains; its update may be refused", self._round_id
                )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 1)


class ClientRuntime:
    """Drives one device through a run until the aggregator says it is finished."""

    def __init__(
        self,
        link: AggregatorLink,
        make_method: Callable[[str], ClientHalf],
        state_dir: Path,
        token: str | None,
        name: str = "",
        threshold_floor: ThresholdFloor | None = None,
        guard: PolicyGuard | None = None,
    ) -> None:
        self.link = link
        self.threshold_floor = threshold_floor or ThresholdFloor()
        self.guard = guard  # the device's privacy floor; `fedprompt client run` always passes one
        self._declined: tuple[str, int] | None = None  # (run, round) last refused under the policy
        self.make_method = make_method
        self.state_dir = state_dir
        self.token = token
        self.name = name
        self._methods: dict[str, ClientHalf] = {}
        self._pending = PendingUploadFile(state_dir)
        self._sitting_out: tuple[str, int] | None = None  # (run, round) already said to be sat out
        self.identity: Identity | None = None
        self.chunk_bytes = 1 << 20
        self.max_payload_bytes = 64 * 2**20

    # ---- identity --------------------------------------------------------------------------

    @property
    def _identity_path(self) -> Path:
        return self.state_dir / "aggregator-identity.json"

    def _load_identity(self) -> Identity | None:
        try:
            identity = Identity(**json.loads(self._identity_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        same_token = self.token is None or self.token.split(".")[0] == identity.token_id
        return identity if identity.aggregator == self.link.address and same_token else None

    def enroll(self) -> Identity:
        if not self.token:
            raise ClientError(
                "this device is not enrolled: pass an enrolment token (--token or FEDPROMPT_TOKEN)"
            )
        try:
            reply = self.link.call(
                "enrol",
                lambda: self.link.stub.Enroll(
                    pb.EnrollRequest(
                        token=self.token,
                        client_name=self.name,
                        device_key=device_identity(self.state_dir).public_key,
                    ),
                    timeout=self.link.rpc_timeout_s,
                    metadata=token_metadata(self.token),
                ),
            )
        except grpc.RpcError as error:
            raise ClientError(f"enrolment refused by {self.link.address}: {error.details()}") from None
        self.link.adopt_limits(reply.max_message_bytes)
        self.chunk_bytes = min(reply.chunk_bytes or self.chunk_bytes, self.link.max_message_bytes // 2)
        self.max_payload_bytes = reply.max_payload_bytes or self.max_payload_bytes
        identity = Identity(
            self.link.address, self.token.split(".")[0], reply.client_id, reply.session, reply.run_id
        )
        write_atomically(self._identity_path, json.dumps(identity.__dict__).encode())
        log.info("enrolled as %s in run %s", identity.client_id, identity.run_id)
        return identity

    def _authenticated(self, what: str, rpc: Callable[[str], T], give_up_at: float | None = None) -> T:
        """Call with the session; on an unknown session (e.g. revoked, or state reset) enrol again once."""
        if self.identity is None:
            self.identity = self._load_identity() or self.enroll()
        try:
            return self.link.call(what, lambda: rpc(self.identity.session), give_up_at)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            if not self.token:
                raise ClientError(
                    f"the aggregator no longer accepts this device ({error.details()}); "
                    "enrol it again with a new token (--token)"
                ) from None
            log.info("session not accepted (%s); enrolling again", error.details())
            self.identity = self.enroll()
            return self.link.call(what, lambda: rpc(self.identity.session), give_up_at)

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> dict[str, object]:
        """Poll, train and upload until the run is finished; returns the final model's header."""
        while True:
            header, payload = self._pull()
            if header.status == pb.FINISHED:
                self._pending.clear()
                return self._fetch_final()
            if header.status == pb.TRAIN:
                self._take_part(header, payload)
            else:
                time.sleep(max(0.05, header.retry_after_s) * random.uniform(0.8, 1.2))

    def _receive(self, stream: Iterator, what: str) -> tuple[object, bytes]:
        """A streamed reply: the header, then the payload joined from its chunks."""
        header = next(stream).header
        try:
            payload = join_chunks(
                (chunk.data for chunk in stream), header.payload_bytes, self.max_payload_bytes
            )
        except CodecError as error:
            raise ClientError(f"malformed {what} from the aggregator: {error}") from None
        return header, payload

    def _pull(self) -> tuple[pb.TaskHeader, bytes]:
        return self._authenticated(
            "pull task",
            lambda session: self._receive(
                self.link.stub.PullTask(
                    pb.PullTaskRequest(session=session),
                    timeout=self.link.rpc_timeout_s,
                    metadata=session_metadata(session),
                ),
                "task",
            ),
        )

    def _method(self, name: str) -> ClientHalf:
        if name not in self._methods:
            self._methods[name] = self.make_method(name)
        return self._methods[name]

    def _take_part(self, header: pb.TaskHeader, payload: bytes) -> None:
        """One round: send the update saved for it if there is one, else train, save, send."""
        deadline = time.monotonic() + (header.deadline_in_s or header.deadline_unix - time.time())
        saved = self._pending.load()
        if saved is not None and self._pending.spent():
            log.info(
                "round %d: the saved update's masked input went out in a session the round did not "
                "accept; training afresh (a second sum of the same update would reveal it)",
                saved.round_id,
            )
            saved = None
            self._pending.clear()
        if saved is not None and saved.answers(header.run_id, header.round_id):
            if saved.refusal is not None:
                self._sit_out(saved, header)
                return
            log.info(
                "round %d: sending the update trained before a restart (not training again)", saved.round_id
            )
            self._send(saved, header, deadline)
            return
        if saved is not None:
            log.info("dropping the unsent update of round %d: the aggregator moved on", saved.round_id)
            self._pending.clear()
        settings = self._settings(header)
        self._check_bundle(header)
        if self.guard is not None:
            try:
                core = TaskSettings.from_dict(header.method, settings).core
                self.guard.admit(header.run_id, header.round_id, core)
            except PolicyRefusal as refusal:
                self._decline(header, refusal)
                return
        if self._pending.mark_training(header.run_id, header.round_id):
            log.warning(
                "round %d: training again: its last training was interrupted before its update was "
                "saved; under local DP this round's privacy cost is paid a second time",
                header.round_id,
            )
        upload, deadline = self._train(header, payload, deadline, settings)
        self._pending.save(upload)
        self._send(upload, header, deadline)

    def _check_bundle(self, header: pb.TaskHeader) -> None:
        """Stop before training when the run's bundle is not this device's (it can never fit)."""
        digest = self._method(header.method).bundle_digest
        if header.bundle_digest and header.bundle_digest != digest:
            raise ClientError(
                f"this run uses bundle {header.bundle_digest[:12]}, this device has "
                f"{digest[:12]}: give the client the run's bundle (--bundle)"
            )

    def _sit_out(self, refused: PendingUpload, task: pb.TaskHeader) -> None:
        """The round of a refused update is offered again: wait for the next one, without training."""
        if self._sitting_out != (task.run_id, task.round_id):
            self._sitting_out = (task.run_id, task.round_id)
            log.info("round %d: sitting it out (its update was refused: %s)", task.round_id, refused.refusal)
        time.sleep(max(1.0, task.heartbeat_interval_s) * random.uniform(0.8, 1.2))

    def _send(self, upload: PendingUpload, task: pb.TaskHeader, deadline: float) -> None:
        if task.HasField("secure_aggregation"):
            self._secure_upload(upload, task.secure_aggregation)
        else:
            self._upload(upload, deadline)

    def _secure_upload(self, upload: PendingUpload, secure: pb.SecureAggregation) -> None:
        """Sum the update in the task's session; the saved update stays until a session has it."""

        def call(request: pb.SecAggRequest) -> pb.SecAggReply:
            def rpc(session: str) -> pb.SecAggReply:
                request.session = session
                return self.link.stub.SecAggStep(
                    request, timeout=self.link.rpc_timeout_s, metadata=session_metadata(session)
                )

            return self._authenticated("secure aggregation", rpc)

        params = params_from_message(secure)
        channel = GrpcSecureChannel(call, upload.header.run_id, upload.round_id, params.session_id)
        header = upload.header
        try:
            tensors = decode_tensor_set(upload.payload)
            outcome = secure_upload(
                params,
                tensors,
                header.num_examples,
                dict(header.metrics),
                dict(header.privacy),
                channel,
                device_identity(self.state_dir),
                PeerPins(self.state_dir),
                self.threshold_floor,
                before_masked_input=self._pending.mark_spent,
            )
        except ClientError as error:
            log.warning("round %d: %s; keeping the update for a later try", upload.round_id, error)
            return
        if outcome is Outcome.SUMMED:
            log.info("round %d: update securely summed", upload.round_id)
            self._pending.clear()
        elif outcome is Outcome.SPENT:
            log.info("round %d: update %s", upload.round_id, outcome.value)

    @staticmethod
    def _settings(header: pb.TaskHeader) -> dict:
        """The task's settings, checked against the method's spec (core and its client section)."""
        settings = json.loads(header.settings_json or "{}")
        try:
            TaskSettings.from_dict(header.method, settings)
        except SettingsError as error:
            raise ClientError(
                f"the aggregator's round settings do not fit this client ({error}); if the aggregator "
                "runs a newer fedprompt, upgrade the client"
            ) from None
        return settings

    def _decline(self, header: pb.TaskHeader, refusal: PolicyRefusal) -> None:
        """A task below the floor: one line here, the reason to the aggregator (which stops waiting
        for this device in that round), nothing trained or sent; then wait for the next round."""
        if self._declined != (header.run_id, header.round_id):
            self._declined = (header.run_id, header.round_id)
            log.warning("round %d: refused by this device's privacy policy: %s", header.round_id, refusal)
            request = pb.DeclineRequest(run_id=header.run_id, round_id=header.round_id, reason=str(refusal))

            def rpc(session: str) -> pb.DeclineReply:
                request.session = session
                return self.link.stub.DeclineTask(
                    request, timeout=self.link.rpc_timeout_s, metadata=session_metadata(session)
                )

            try:
                self._authenticated("decline", rpc)
            except grpc.RpcError as error:
                log.warning(
                    "round %d: the aggregator did not take the refusal (%s)", header.round_id, error.details()
                )
        time.sleep(max(1.0, header.heartbeat_interval_s) * random.uniform(0.8, 1.2))

    def _train(
        self, header: pb.TaskHeader, payload: bytes, deadline: float, settings: dict
    ) -> tuple[PendingUpload, float]:
        """Runs the method's round while heartbeating; returns the encoded update and the round's
        latest known deadline."""
        try:
            tensors = decode_tensor_set(payload)
        except CodecError as error:
            raise ClientError(f"malformed task from the aggregator: {error}") from None
        task = RoundTask(
            run_id=header.run_id,
            round_id=header.round_id,
            method=header.method,
            settings=settings,
            tensors=tensors,
            deadline_unix=header.deadline_unix,
        )
        log.info(
            "round %d/%d: training (%s), deadline in %.0f s",
            task.round_id,
            header.total_rounds,
            task.method,
            deadline - time.monotonic(),
        )
        save_task(self.state_dir, task)
        started = time.monotonic()
        interval = header.heartbeat_interval_s or 10.0
        with Heartbeat(self.link, self.identity.session, task.round_id, interval, deadline) as heartbeat:
            result = self._method(task.method).run_round(task)
        encoding = _ENCODING_NAMES.get(header.update_encoding, "fp32")
        update = encode_tensor_set(result.tensors, encoding)
        log.info(
            "round %d: %d examples, %s, trained in %.1f s, %.1f KB to upload (%s)",
            task.round_id,
            result.num_examples,
            ", ".join(f"{k} {v:.4g}" for k, v in {**result.metrics, **result.privacy}.items())
            or "no metrics",
            time.monotonic() - started,
            len(update) / 1024,
            encoding,
        )
        if "epsilon" in result.privacy:
            settings = TaskSettings.from_dict(task.method, task.settings).core
            log.info(
                "round %d: privacy spent so far: %s",
                task.round_id,
                describe_epsilon(result.privacy["epsilon"], settings.delta, settings.dp, settings.accountant),
            )
        upload_header = pb.UpdateHeader(
            run_id=task.run_id,
            round_id=task.round_id,
            num_examples=result.num_examples,
            metrics=result.metrics,
            privacy=result.privacy,
            payload_bytes=len(update),
            method=task.method,
        )
        return PendingUpload(upload_header, update), heartbeat.deadline

    def _upload(self, upload: PendingUpload, deadline: float) -> None:
        """Push the update, resending it on transient failures (RETRYABLE) with backoff until the
        round's deadline. Accepted (or already received) deletes it; a refusal keeps it, marked,
        so the round is sat out instead of trained again (or stops the client when final);
        without an answer it stays for when the round is offered again."""

        def push(session: str) -> pb.PushUpdateReply:
            header = pb.UpdateHeader()
            header.CopyFrom(upload.header)
            header.session = session
            chunks = [pb.UpdateChunk(header=header)]
            chunks += [pb.UpdateChunk(data=c) for c in iter_chunks(upload.payload, self.chunk_bytes)]
            return self.link.stub.PushUpdate(
                iter(chunks), timeout=max(self.link.rpc_timeout_s, 60.0), metadata=session_metadata(session)
            )

        try:
            self._authenticated("upload", push, give_up_at=max(deadline, time.monotonic() + 1.0))
            log.info("round %d: update accepted", upload.round_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                self._refused(upload, error)
                return
            log.info("round %d: update accepted (already received before a reconnect)", upload.round_id)
        except ClientError as error:
            log.warning("round %d: %s; keeping the update for a later try", upload.round_id, error)
            return
        self._pending.clear()

    def _refused(self, upload: PendingUpload, error: grpc.RpcError) -> None:
        reason = f"{error.code().name}: {error.details()}"
        if dict(error.trailing_metadata() or ()).get(REFUSAL_METADATA) == "final":
            raise ClientError(
                f"round {upload.round_id}: the aggregator refuses this device's updates for good ({reason})"
            )
        self._pending.mark_refused(reason)
        self._sitting_out = (upload.header.run_id, upload.round_id)
        log.warning(
            "round %d: update refused (%s); sitting the round out, not training again",
            upload.round_id,
            reason,
        )

    def _fetch_final(self) -> dict[str, object]:
        header, payload = self._authenticated(
            "fetch global model",
            lambda session: self._receive(
                self.link.stub.FetchGlobal(
                    pb.FetchGlobalRequest(session=session),
                    timeout=self.link.rpc_timeout_s,
                    metadata=session_metadata(session),
                ),
                "model",
            ),
        )
        tensors = decode_tensor_set(payload)
        kept = save_served(self.state_dir, header.run_id, header.round_id, tensors)
        log.info(
            "run %s finished after round %d; the model served to this device %s",
            header.run_id,
            header.round_id,
            "is kept for `fedprompt predict`" if kept else "was fetched (this device never trained for it)",
        )
        return {"run_id": header.run_id, "round_id": header.round_id, "tensors": tensors, "kept": kept}
