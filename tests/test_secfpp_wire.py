"""SecFPP through a real aggregator over gRPC with three real `fedprompt client run` processes,
every byte the aggregator receives and sends recorded by a gRPC server interceptor: what arrives
from the clients is masked (uniform modulo 2**32), no update travels in the clear, and no client's
class-level prompt (read back from its state folder afterwards) appears anywhere on the wire."""

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
[secure_aggregation]
enabled = true
threshold = 3
[training]
n_ctx = {N_CTX}
batch_size = 8
lr = 0.01
dp = "sample"
noise_multiplier = 1.0
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


def test_the_server_receives_only_masked_bytes_and_never_a_class_level_prompt(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    config_path = tmp_path / "aggregator.toml"
    config_path.write_text(CONFIG)
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
    for i in range(CLIENTS):
        (state_file,) = (tmp_path / f"client{i}" / METHOD_STATE_DIR).glob("secfpp-*.tensors")
        class_level = load_tensors(state_file)["class_level"]
        assert class_level.shape == (3, N_CTX, 64) and np.abs(class_level).max() > 0
        patterns = row_patterns(class_level)
        assert any(p in state_file.read_bytes() for p in patterns)  # the search finds what is there
        assert not any(p in data for p in patterns for data in wire)
    final = store.latest_round().tensors
    assert set(final) == {"domain", "centroids"} and final["domain"].shape[1:] == (N_CTX, 64)
    store.close()
