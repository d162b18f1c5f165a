"""The gRPC face of the aggregator and the daemon around it.

Handlers only translate between wire messages and `RoundCoordinator`; every refusal becomes a
gRPC status with one readable line and a log line, and no input can take the daemon down. Every
call first passes `aggregator.door` (places, first-message and idle deadlines), so every RPC is
registered with a request stream: the handler, not gRPC, waits for the message, under a deadline.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from aggregator.config import AggregatorConfig
from aggregator.door import Call, Door
from aggregator.health import HealthServicer, add_health
from aggregator.metrics import AggregatorMetrics
from aggregator.rounds import Refused, RoundCoordinator, Task
from aggregator.store import SQLiteStore
from aggregator.tls import security_label, server_credentials
from fedprompt.common.codec import ENCODINGS, CodecError, iter_chunks, join_chunks
from fedprompt.common.network import REFUSAL_METADATA, is_loopback
from fedprompt.common.secure_round import SecureRoundParams
from protos import fedprompt_pb2 as pb

log = logging.getLogger("fedprompt.aggregator")
_TASK_STATUS = {"train": pb.TRAIN, "wait": pb.WAIT, "finished": pb.FINISHED}
_STEP_STATUS = {
    "pending": pb.SECAGG_PENDING,
    "next": pb.SECAGG_NEXT,
    "done": pb.SECAGG_DONE,
    "aborted": pb.SECAGG_ABORTED,
}


def grpc_message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The same message-size limits on both ends of a channel."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class Malformed:
    """Stands for a request message whose bytes did not parse."""


MALFORMED = Malformed()
_HANDLER_KINDS = {False: grpc.stream_unary_rpc_method_handler, True: grpc.stream_stream_rpc_method_handler}
"""By whether replies stream. Requests always arrive as a stream (a unary client sends one message):
the door, not gRPC, waits for them."""


def _tolerant(message_class: type[Message], counter: Any) -> Callable[[bytes], Message | Malformed]:
    """A deserializer that counts the bytes (`counter`) and returns MALFORMED instead of raising:
    grpc would answer a raising one with INTERNAL and a traceback in the log; the handler answers
    INVALID_ARGUMENT in one line."""

    def parse(data: bytes) -> Message | Malformed:
        counter.inc(len(data))
        try:
            return message_class.FromString(data)
        except DecodeError:
            return MALFORMED

    return parse


def _counted(counter: Any) -> Callable[[Message], bytes]:
    """A serializer that counts the bytes it sends."""

    def serialize(message: Message) -> bytes:
        data = message.SerializeToString()
        counter.inc(len(data))
        return data

    return serialize


def add_service(service: AggregatorService, server: grpc.Server) -> None:
    """Register every RPC of fedprompt.v1.Aggregator (read from the .proto's descriptor) behind
    the door, with tolerant deserializers; wire bytes are counted per RPC."""
    descriptor = pb.DESCRIPTOR.services_by_name["Aggregator"]
    metrics = service.metrics
    handlers = {
        method.name: _HANDLER_KINDS[method.server_streaming](
            _through_door(service, method.name, method.client_streaming, method.server_streaming),
            request_deserializer=_tolerant(
                getattr(pb, method.input_type.name), metrics.bytes_in.labels(method.name)
            ),
            response_serializer=_counted(metrics.bytes_out.labels(method.name)),
        )
        for method in descriptor.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


def _well_formed(request: Any) -> Any:
    """The request, refusing MALFORMED (bytes that did not parse)."""
    if request is MALFORMED:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")
    return request


def _through_door(service: AggregatorService, name: str, streams_in: bool, streams_out: bool) -> Callable:
    """The handler `name` behind the door. `Refused` (and malformed request bytes) becomes its gRPC
    status plus a log line, any unexpected error INTERNAL plus a log line, so that one bad request
    never crashes the daemon. Each refusal is counted by its status code."""
    handler = getattr(service, name)
    refused = service.metrics.refused

    def serve_call(request_stream: Iterator[Any], context: grpc.ServicerContext) -> Any:
        try:
            call = service.door.admit(context, name)
            messages = call.requests(request_stream)
            if streams_in:
                request = (_well_formed(message) for message in messages)
            else:
                request = _well_formed(next(messages, None))
                if request is None:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "no request message")
            result = handler(request, call)
            return call.responses(result) if streams_out else result
        except Refused as refusal:
            log.warning("%s refused for %s: %s", name, context.peer(), refusal.message)
            refused.labels(name, refusal.code.name).inc()
            if refusal.final:
                context.set_trailing_metadata(((REFUSAL_METADATA, "final"),))
            context.abort(refusal.code, refusal.message)
        except grpc.RpcError:  # grpc already ended the call: the client left, or a message was too large
            log.warning(
                "%s for %s cut off: the client went away or sent a message over server.max_message_mb",
                name,
                context.peer(),
            )
            refused.labels(name, grpc.StatusCode.CANCELLED.name).inc()
            context.abort(grpc.StatusCode.CANCELLED, "request stream ended early")
        except Exception:
            log.exception("%s failed for %s", name, context.peer())
            refused.labels(name, grpc.StatusCode.INTERNAL.name).inc()
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the aggregator; see its log")

    return serve_call


class AggregatorService:
    """Implements fedprompt.v1.Aggregator on top of a RoundCoordinator: each handler takes the
    request (or the stream of request messages) and the door's `Call`."""

    def __init__(self, coordinator: RoundCoordinator, metrics: AggregatorMetrics | None = None) -> None:
        self.coordinator = coordinator
        self.metrics = AggregatorMetrics() if metrics is None else metrics
        self.server_config = coordinator.config.server
        self.rules = coordinator.config.rounds
        self.door = Door(self.server_config, coordinator.store)

    def _chunks(self, payload: bytes) -> Iterator[bytes]:
        return iter_chunks(payload, self.server_config.chunk_kb * 1024)

    def _client(self, call: Call, session: str) -> str:
        """The client holding `session` (UNAUTHENTICATED if none), counted against its calls."""
        client_id = self.coordinator.authenticate(session)
        call.bind(client_id)
        return client_id

    def Enroll(self, request: pb.EnrollRequest, call: Call) -> pb.EnrollReply:
        client_id, session = self.coordinator.enroll(request.token, request.client_name, request.device_key)
        return pb.EnrollReply(
            client_id=client_id,
            session=session,
            run_id=self.coordinator.run_id,
            heartbeat_interval_s=self.rules.heartbeat_interval_s,
            max_message_bytes=self.server_config.max_message_bytes,
            max_payload_bytes=self.server_config.max_payload_bytes,
            chunk_bytes=self.server_config.chunk_kb * 1024,
            client_timeout_s=self.rules.client_timeout_s,
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, call: Call) -> pb.HeartbeatReply:
        client_id = self._client(call, request.session)
        round_open, deadline_in_s = self.coordinator.heartbeat(client_id, request.round_id)
        return pb.HeartbeatReply(
            heartbeat_interval_s=self.rules.heartbeat_interval_s,
            round_open=round_open,
            deadline_in_s=deadline_in_s,
        )

    def PullTask(self, request: pb.PullTaskRequest, call: Call) -> Iterator[pb.TaskChunk]:
        client_id = self._client(call, request.session)
        task: Task = self.coordinator.next_task(client_id)
        header = pb.TaskHeader(
            status=_TASK_STATUS[task.status],
            retry_after_s=task.retry_after_s,
            run_id=self.coordinator.run_id,
            round_id=task.round_id,
            total_rounds=self.rules.rounds,
            heartbeat_interval_s=self.rules.heartbeat_interval_s,
            client_timeout_s=self.rules.client_timeout_s,
        )
        if task.status == "train":
            header.method = self.coordinator.config.method.name
            header.settings_json = self.coordinator.client_settings_json
            header.bundle_digest = self.coordinator.bundle_digest
            header.deadline_unix = task.deadline_unix
            header.deadline_in_s = task.deadline_in_s
            header.payload_bytes = len(task.payload)
            header.update_encoding = ENCODINGS[self.server_config.update_encoding]
            if task.secure is not None:
                header.secure_aggregation.CopyFrom(_secure_message(task.secure))
        return iter(
            [pb.TaskChunk(header=header), *(pb.TaskChunk(data=c) for c in self._chunks(task.payload))]
        )

    def PushUpdate(self, chunks: Iterator[pb.UpdateChunk], call: Call) -> pb.PushUpdateReply:
        first = next(chunks, None)
        if first is None or not first.HasField("header"):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "an update must start with its header")
        header = first.header
        client_id = self._client(call, header.session)
        try:
            payload = join_chunks(
                (self._data_of(chunk) for chunk in chunks),
                header.payload_bytes,
                self.server_config.max_payload_bytes,
            )
        except CodecError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        self.coordinator.submit(
            client_id,
            header.run_id,
            header.round_id,
            header.num_examples,
            dict(header.metrics),
            dict(header.privacy),
            payload,
            header.method,
        )
        self.metrics.updates_accepted.inc()
        return pb.PushUpdateReply(accepted=True, message=f"update for round {header.round_id} accepted")

    def DeclineTask(self, request: pb.DeclineRequest, call: Call) -> pb.DeclineReply:
        client_id = self._client(call, request.session)
        self.coordinator.decline(client_id, request.run_id, request.round_id, request.reason)
        return pb.DeclineReply(noted=True)

    def SecAggStep(self, request: pb.SecAggRequest, call: Call) -> pb.SecAggReply:
        client_id = self._client(call, request.session)
        reply = self.coordinator.secure_step(
            client_id,
            request.run_id,
            request.round_id,
            request.session_id,
            request.step,
            request.message,
            [(spec.name, tuple(spec.shape)) for spec in request.layout],
            dict(request.privacy),
        )
        return pb.SecAggReply(
            status=_STEP_STATUS[reply.status],
            message=reply.message,
            retry_after_s=reply.retry_after_s,
            deadline_in_s=reply.deadline_in_s,
            reason=reply.reason,
        )

    @staticmethod
    def _data_of(chunk: pb.UpdateChunk) -> bytes:
        if not chunk.HasField("data"):
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, "only the first chunk of an update may be a header"
            )
        return chunk.data

    def FetchGlobal(self, request: pb.FetchGlobalRequest, call: Call) -> Iterator[pb.ModelChunk]:
        client_id = self._client(call, request.session)
        round_id, payload = self.coordinator.served_model(client_id)
        header = pb.ModelHeader(
            run_id=self.coordinator.run_id,
            round_id=round_id,
            method=self.coordinator.config.method.name,
            finished=self.coordinator.finished,
            payload_bytes=len(payload),
        )
        return iter([pb.ModelChunk(header=header), *(pb.ModelChunk(data=c) for c in self._chunks(payload))])


def _secure_message(params: SecureRoundParams) -> pb.SecureAggregation:
    return pb.SecureAggregation(
        session_id=params.session_id,
        member_id=params.member_id,
        threshold=params.threshold,
        degree=params.degree or 0,
        modulus_bits=params.modulus_bits,
        value_bound=params.value_bound,
        example_cap=params.example_cap,
        member_names=params.member_names,
    )


def start_server(
    coordinator: RoundCoordinator, metrics: AggregatorMetrics
) -> tuple[grpc.Server, int, HealthServicer]:
    """Binds and starts the gRPC server (TLS when configured) with the Aggregator and the standard
    health service; returns it with the bound port (useful with port 0) and the health servicer."""
    config = coordinator.config.server
    credentials = server_credentials(coordinator.config)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="grpc"),
        options=grpc_message_options(config.max_message_bytes),
        maximum_concurrent_rpcs=config.max_calls,
    )
    add_service(AggregatorService(coordinator, metrics), server)
    health = add_health(server, pb.DESCRIPTOR.services_by_name["Aggregator"].full_name)
    address = f"{config.host}:{config.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise Refused(
            grpc.StatusCode.UNAVAILABLE, f"cannot listen on {address} (in use or not a local address)"
        )
    server.start()
    return server, port, health


def _serve_metrics(config: AggregatorConfig, coordinator: RoundCoordinator) -> tuple[AggregatorMetrics, Any]:
    """The daemon's metrics, bound to the coordinator, and their HTTP server (None when
    `server.metrics_address` is empty)."""
    metrics = AggregatorMetrics()
    metrics.watch(lambda: coordinator.committed, lambda: coordinator.open_round_id, coordinator.live_count)
    metrics.restored(coordinator.run_id, coordinator.store.latest_round().metrics)
    coordinator.on_commit.append(lambda record: metrics.round_committed(coordinator.run_id, record.metrics))
    address = config.server.metrics_address
    if not address:
        return metrics, None
    try:
        http, port = metrics.serve(address)
    except OSError as error:
        raise Refused(grpc.StatusCode.UNAVAILABLE, f"cannot serve metrics on {address}: {error}") from None
    host = address.rpartition(":")[0]
    if not is_loopback(host.strip("[]")):
        log.warning("metrics on %s are plain HTTP without authentication (counts only, no client ids)", host)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return metrics, http


def serve(config: AggregatorConfig, ready: Callable[[int], None] | None = None) -> None:
    """Runs the daemon until SIGTERM/SIGINT: rounds first, then serving the final model. The
    health service says SERVING until it stops or the round driver fails."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    store = SQLiteStore(config.state_path)
    http = None
    try:
        coordinator = RoundCoordinator(store, config)
        metrics, http = _serve_metrics(config, coordinator)
        server, port, health = start_server(coordinator, metrics)
        security = security_label(config)
        if security == "plaintext" and not is_loopback(config.server.host):
            log.warning(
                "serving WITHOUT TLS on %s (allow_insecure): put it behind a TLS-terminating proxy",
                config.server.host,
            )
        log.info(
            "listening on %s:%d (%s) | run %s | method %s | %d rounds | state %s",
            config.server.host,
            port,
            security,
            coordinator.run_id,
            config.method.name,
            config.rounds.rounds,
            config.state_path,
        )
        if ready is not None:
            ready(port)
        failures: list[BaseException] = []

        def drive() -> None:
            try:
                coordinator.run()
            except Exception as error:
                log.exception("the round driver failed; stopping")
                failures.append(error)
                stop.set()

        driver = threading.Thread(target=drive, name="rounds", daemon=True)
        driver.start()
        stop.wait()
        log.info("stopping")
        health.enter_graceful_shutdown()
        coordinator.stop()
        server.stop(grace=2).wait()
        driver.join(timeout=5)
        if failures:
            raise RuntimeError(f"the round driver failed: {failures[0]}")
    finally:
        if http is not None:
            http.shutdown()
        store.close()
