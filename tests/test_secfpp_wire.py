"""SecFPP through a real aggregator over gRPC with four real `fedprompt client run` processes,
every byte the aggregator receives and sends recorded by a gRPC server interceptor: what arrives
from the clients is masked (uniform modulo 2**32), no update travels in the clear, the summed
layout every client announces at step 0 is exactly the method's upload (so no class-level prompt
rides inside the masked vector), and no client's class-level prompt (read back from its state
folder afterwards) appears anywhere on the wire. A second test feeds the same checks a recording
with class-level data put into the upload, and they catch it."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from test_federated import client_command, write_image_folder
from test_secagg_uniformity import bytes_uniformity_p_value, ks_uniform_p_value

from aggregator.config import load_config
from aggregator.rounds import RoundCoordinator
from aggregator.server import AggregatorService, add_service, grpc_message_options
from aggregator.store import SQLiteStore
from edge_client.methods.local_state import METHOD_STATE_DIR, load_tensors
from fedprompt.common.secagg import MaskedInput
from protos import fedprompt_pb2 as pb

N_CTX, CLIENTS = 4, 4
SIGNIFICANCE = 1e-3
CONFIG = f"""
[server]
state = "state.sqlite"
update_encoding = "fp32"
[rounds]
rounds = 2
min_clients = {CLIENTS}
min_fit = {CLIENTS}
min_updates = {CLIENTS}
round_timeout_s = 240.0
poll_interval_s = 0.2
heartbeat_interval_s = 1.0
client_timeout_s = 60.0
[method]
name = "secfpp"
bundle = "BUNDLE"
[secure_aggregation]
enabled = true
threshold = 3
[training]
n_ctx = {N_CTX}
batch_size = 8
lr = 0.01
dp = "sample"
noise_multiplier = 1.0
[secfpp]
clusters = 2
cluster_dim = 4
"""
_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


class WireRecorder(grpc.ServerInterceptor):
    """Keeps the serialized bytes of every request and response, as they cross the wire."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.responses: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]

        def read(data: bytes):
            with self._lock:
                self.requests.append((method, data))
            return handler.request_deserializer(data)

        def write(message) -> bytes:
            data = handler.response_serializer(message)
            with self._lock:
                self.responses.append((method, data))
            return data

        factory, behaviour = _FACTORIES[handler.request_streaming, handler.response_streaming]
        return factory(getattr(handler, behaviour), request_deserializer=read, response_serializer=write)


def row_patterns(class_level: np.ndarray) -> list[bytes]:
    """The bytes of every non-zero row of the class-level prompt, as fp32 and as fp16."""
    rows = class_level.reshape(-1, class_level.shape[-1])
    rows = rows[np.abs(rows).max(axis=1) > 0]
    return [r[:8].astype("<f4").tobytes() for r in rows] + [r[:8].astype("<f2").tobytes() for r in rows]


UPLOAD = {"domain", "member", "descriptor", "spread"}
"""SecFPP's summed upload (`edge_client.methods.domain_clusters.slot_upload`)."""


def class_level_findings(
    requests: list[tuple[str, bytes]], wire: list[bytes], class_level: np.ndarray
) -> list[str]:
    """Every way `class_level` reaches the aggregator in the recording: a tensor other than the
    upload's, or of the class-level shape, in a step-0 summed layout (it would ride masked inside
    the sum), or one of its rows in the clear anywhere."""
    findings = []
    for method, data in requests:
        if method != "SecAggStep":
            continue
        request = pb.SecAggRequest.FromString(data)
        for spec in request.layout:
            shape = tuple(spec.shape)
            if spec.name not in UPLOAD or shape[-3:] == class_level.shape:
                findings.append(f"step {request.step} layout carries {spec.name} {shape}")
    patterns = row_patterns(class_level)
    if any(p in data for p in patterns for data in wire):
        findings.append("a class-level row is on the wire in the clear")
    return findings


def test_the_checks_catch_class_level_data_put_into_the_upload() -> None:
    class_level = np.random.default_rng(1).normal(0, 0.02, (3, N_CTX, 64)).astype(np.float32)
    honest = [("domain", (2, N_CTX, 64)), ("member", (2,)), ("descriptor", (2, 8)), ("spread", (2,))]

    def step0(layout: list[tuple[str, tuple[int, ...]]]) -> tuple[str, bytes]:
        specs = [pb.TensorSpec(name=name, shape=shape) for name, shape in layout]
        return "SecAggStep", pb.SecAggRequest(step=0, message=b"masked", layout=specs).SerializeToString()

    clean = [step0(honest)]
    assert class_level_findings(clean, [data for _, data in clean], class_level) == []
    masked_inside = [step0([*honest, ("class_level", (3, N_CTX, 64))])]
    renamed = [step0([*honest[:3], ("spread", (3, N_CTX, 64))])]
    in_clear = [step0(honest), ("PushUpdate", b"x" + class_level[1].astype("<f2").tobytes())]
    for leak, finding in (
        (masked_inside, "step 0 layout carries class_level (3, 4, 64)"),
        (renamed, "step 0 layout carries spread (3, 4, 64)"),
        (in_clear, "a class-level row is on the wire in the clear"),
    ):
        assert class_level_findings(leak, [data for _, data in leak], class_level) == [finding]


def test_the_server_receives_only_masked_bytes_and_never_a_class_level_prompt(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    config_path = tmp_path / "aggregator.toml"
    config_path.write_text(CONFIG.replace("BUNDLE", str(tiny_bundle)))
    config = load_config(config_path)
    store = SQLiteStore(config.state_path)
    tokens = [store.issue_token(f"device {i}") for i in range(CLIENTS)]
    coordinator = RoundCoordinator(store, config)
    recorder = WireRecorder()
    server = grpc.server(
        ThreadPoolExecutor(max_workers=16),
        interceptors=[recorder],
        options=grpc_message_options(config.server.max_message_bytes),
    )
    add_service(AggregatorService(coordinator), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    driver = threading.Thread(target=coordinator.run, daemon=True)
    driver.start()
    clients = []
    for i, token in enumerate(tokens):
        data = write_image_folder(tmp_path / f"d{i}", seed=i)
        command = client_command(f"127.0.0.1:{port}", tiny_bundle, data, tmp_path / f"client{i}")
        clients.append(
            subprocess.Popen(
                [*command, "--token", token], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        for client in clients:
            out, err = client.communicate(timeout=300)
            assert client.returncode == 0, err[-3000:]
            assert "finished after round 2" in out and "update securely summed" in err + out
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
        coordinator.stop()
        server.stop(0)
        driver.join(10)

    records = store.rounds()
    assert [r.metrics["secure_aggregation"]["survivors"] for r in records] == [CLIENTS, CLIENTS]
    assert all(not c.metrics for r in records for c in r.clients)
    assert all(r.metrics["epsilon_max"] > 0 for r in records)  # privacy reports travel in the clear
    methods = {method for method, _ in recorder.requests}
    assert "SecAggStep" in methods and "PushUpdate" not in methods  # no update in the clear

    masked = []
    for method, data in recorder.requests:
        request = pb.SecAggRequest.FromString(data) if method == "SecAggStep" else None
        if request is not None and request.step == 2 and request.message:
            masked.append(MaskedInput.from_bytes(request.message).values())
    assert len(masked) == 2 * CLIENTS
    pooled = np.concatenate(masked)
    assert bytes_uniformity_p_value(pooled) > SIGNIFICANCE
    assert ks_uniform_p_value(pooled) > SIGNIFICANCE

    wire = [data for _, data in recorder.requests + recorder.responses]
    assert not any(b"cluster" in data for _, data in recorder.requests)  # the device's cluster stays there
    layouts = [pb.SecAggRequest.FromString(d).layout for m, d in recorder.requests if m == "SecAggStep"]
    assert sum(1 for layout in layouts if layout) == 2 * CLIENTS  # every client announced one per round
    for i in range(CLIENTS):
        (state_file,) = (tmp_path / f"client{i}" / METHOD_STATE_DIR).glob("secfpp-*.tensors")
        class_level = load_tensors(state_file)["class_level"]
        assert class_level.shape == (3, N_CTX, 64) and np.abs(class_level).max() > 0
        assert any(p in state_file.read_bytes() for p in row_patterns(class_level))  # the search works
        assert class_level_findings(recorder.requests, wire, class_level) == []
    final = store.latest_round().tensors
    assert set(final) == {"domain", "centroids"} and final["domain"].shape[1:] == (N_CTX, 64)
    store.close()
