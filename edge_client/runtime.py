"""The edge client's network side: enrol, poll for tasks, train through a method's client half,
heartbeat while training, upload the update in chunks, and survive an aggregator that is not up
yet or restarts (exponential backoff with jitter, bounded by `patience_s` of continuous failure).

The runtime knows no method: it turns a task into a `RoundTask`, hands it to the `ClientMethod`
named in the task, and ships back the `RoundResult`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from edge_client.methods.base import ClientMethod, RoundResult, RoundTask
from fedprompt.common.codec import CodecError, decode_tensor_set, encode_tensor_set, iter_chunks, join_chunks
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
)
_ENCODING_NAMES = {pb.FP32: "fp32", pb.FP16: "fp16", pb.INT8: "int8"}


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
    with one clear line after `patience_s` without any successful call."""

    def __init__(self, address: str, patience_s: float, rpc_timeout_s: float = 30.0) -> None:
        self.address = address
        self.patience_s = patience_s
        self.rpc_timeout_s = rpc_timeout_s
        self.max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self._open()

    def _open(self) -> None:
        self.channel = grpc.insecure_channel(self.address, options=channel_options(self.max_message_bytes))
        self.stub = pb_grpc.AggregatorStub(self.channel)

    def adopt_limits(self, max_message_bytes: int) -> None:
        """Use the message limit the aggregator announced (bounded by a sane cap)."""
        wanted = min(max(max_message_bytes, 1), MAX_MESSAGE_CAP_BYTES)
        if wanted != self.max_message_bytes:
            self.max_message_bytes = wanted
            self.channel.close()
            self._open()

    def call(self, what: str, rpc: Callable[[], T], give_up_at: float | None = None) -> T:
        """Run `rpc` until it succeeds, retrying transient failures; other errors propagate."""
        deadline = time.monotonic() + self.patience_s if give_up_at is None else give_up_at
        delays = backoff_delays()
        while True:
            try:
                return rpc()
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE:
                    raise
                delay = next(delays)
                if time.monotonic() + delay > deadline:
                    raise ClientError(
                        f"cannot reach the aggregator at {self.address} ({what}: {error.details()}); "
                        f"gave up after {self.patience_s:.0f} s"
                    ) from None
                log.info("aggregator unavailable (%s); retrying in %.1f s", what, delay)
                time.sleep(delay)

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
    """Tells the aggregator every `interval_s` that this client is alive, while it trains."""

    def __init__(self, link: AggregatorLink, session: str, round_id: int, interval_s: float) -> None:
        self._link, self._session, self._round_id, self._interval = link, session, round_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                reply = self._link.stub.Heartbeat(
                    pb.HeartbeatRequest(session=self._session, round_id=self._round_id),
                    timeout=self._link.rpc_timeout_s,
                )
            except grpc.RpcError as error:
                log.info("heartbeat failed (%s); training goes on", error.code().name)
                continue
            if not reply.round_open:
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
        make_method: Callable[[str], ClientMethod],
        state_dir: Path,
        token: str | None,
        name: str = "",
    ) -> None:
        self.link = link
        self.make_method = make_method
        self.state_dir = state_dir
        self.token = token
        self.name = name
        self._methods: dict[str, ClientMethod] = {}
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
                    pb.EnrollRequest(token=self.token, client_name=self.name), timeout=self.link.rpc_timeout_s
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
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._identity_path.write_text(json.dumps(identity.__dict__))
        os.chmod(self._identity_path, 0o600)
        log.info("enrolled as %s in run %s", identity.client_id, identity.run_id)
        return identity

    def _authenticated(self, what: str, rpc: Callable[[str], T]) -> T:
        """Call with the session; on an unknown session (e.g. revoked, or state reset) enrol again once."""
        if self.identity is None:
            self.identity = self._load_identity() or self.enroll()
        try:
            return self.link.call(what, lambda: rpc(self.identity.session))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            log.info("session not accepted (%s); enrolling again", error.details())
            self.identity = self.enroll()
            return self.link.call(what, lambda: rpc(self.identity.session))

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> dict[str, object]:
        """Poll, train and upload until the run is finished; returns the final model's header."""
        while True:
            header, payload = self._pull()
            if header.status == pb.FINISHED:
                return self._fetch_final()
            if header.status == pb.TRAIN:
                self._train_and_upload(header, payload)
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
                self.link.stub.PullTask(pb.PullTaskRequest(session=session), timeout=self.link.rpc_timeout_s),
                "task",
            ),
        )

    def _method(self, name: str) -> ClientMethod:
        if name not in self._methods:
            self._methods[name] = self.make_method(name)
        return self._methods[name]

    def _train_and_upload(self, header: pb.TaskHeader, payload: bytes) -> None:
        try:
            tensors = decode_tensor_set(payload)
        except CodecError as error:
            raise ClientError(f"malformed task from the aggregator: {error}") from None
        task = RoundTask(
            run_id=header.run_id,
            round_id=header.round_id,
            method=header.method,
            settings=json.loads(header.settings_json or "{}"),
            tensors=tensors,
            deadline_unix=header.deadline_unix,
        )
        log.info(
            "round %d/%d: training (%s), deadline in %.0f s",
            task.round_id,
            header.total_rounds,
            task.method,
            task.deadline_unix - time.time(),
        )
        started = time.monotonic()
        with Heartbeat(self.link, self.identity.session, task.round_id, header.heartbeat_interval_s or 10.0):
            result = self._method(task.method).run_round(task)
        encoding = _ENCODING_NAMES.get(header.update_encoding, "fp32")
        update = encode_tensor_set(result.tensors, encoding)
        self._upload(task, result, update)
        log.info(
            "round %d: %d examples, %s, trained in %.1f s, uploaded %.1f KB (%s)",
            task.round_id,
            result.num_examples,
            ", ".join(f"{k} {v:.4g}" for k, v in {**result.metrics, **result.privacy}.items())
            or "no metrics",
            time.monotonic() - started,
            len(update) / 1024,
            encoding,
        )

    def _upload(self, task: RoundTask, result: RoundResult, update: bytes) -> None:
        """Push the update, retrying transient failures until the round's deadline; a refusal
        (round closed, duplicate) is logged and the client goes back to polling."""

        def push(session: str) -> pb.PushUpdateReply:
            header = pb.UpdateHeader(
                session=session,
                run_id=task.run_id,
                round_id=task.round_id,
                num_examples=result.num_examples,
                metrics=result.metrics,
                privacy=result.privacy,
                payload_bytes=len(update),
            )
            chunks = [pb.UpdateChunk(header=header)]
            chunks += [pb.UpdateChunk(data=c) for c in iter_chunks(update, self.chunk_bytes)]
            return self.link.stub.PushUpdate(iter(chunks), timeout=max(self.link.rpc_timeout_s, 60.0))

        try:
            self._authenticated("upload", push)
        except grpc.RpcError as error:
            log.warning(
                "round %d: update refused (%s: %s)", task.round_id, error.code().name, error.details()
            )

    def _fetch_final(self) -> dict[str, object]:
        header, payload = self._authenticated(
            "fetch global model",
            lambda session: self._receive(
                self.link.stub.FetchGlobal(
                    pb.FetchGlobalRequest(session=session), timeout=self.link.rpc_timeout_s
                ),
                "model",
            ),
        )
        tensors = decode_tensor_set(payload)
        log.info("run %s finished after round %d; final global model fetched", header.run_id, header.round_id)
        return {"run_id": header.run_id, "round_id": header.round_id, "tensors": tensors}
