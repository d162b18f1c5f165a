"""The edge client's runtime against real aggregators over loopback."""

from __future__ import annotations

import subprocess
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from aggregator_process import FEDPROMPT, AggregatorProcess, write_config
from aggregator_process import free_port as closed_port
from PIL import Image

from aggregator.store import SQLiteStore
from edge_client.device_run import load_device_run
from edge_client.runtime import AggregatorLink, ClientError, backoff_delays
from protos import fedprompt_pb2 as pb


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    delays = list(islice(backoff_delays(base_s=0.5, cap_s=8.0), 10))
    for n, delay in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, so clients spread out


def test_an_unreachable_aggregator_fails_with_one_line_within_the_patience() -> None:
    address = f"127.0.0.1:{closed_port()}"
    link = AggregatorLink(address, patience_s=2.0, rpc_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ClientError) as error:
        link.call("enrol", lambda: link.stub.Enroll(pb.EnrollRequest(token="t"), timeout=1.0))
    assert time.monotonic() - started < 6.0
    message = str(error.value)
    assert message.startswith(f"cannot reach the aggregator at {address}") and "\n" not in message
    link.close()


def write_image_folder(root: Path, seed: int, per_class: int = 6) -> Path:
    """A tiny ImageFolder whose classes have distinct patterns (stripes, checks, a disc)."""
    rng = np.random.default_rng(seed)
    grid = np.indices((32, 32))
    patterns = {
        "stripes": (grid[0] // 4) % 2,
        "checks": ((grid[0] // 8) + (grid[1] // 8)) % 2,
        "disc": ((grid[0] - 16) ** 2 + (grid[1] - 16) ** 2 < 100).astype(int),
    }
    for name, mask in patterns.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = rng.integers(128, 256, size=3)
            pixels = mask[..., None] * colour + rng.integers(0, 40, size=(32, 32, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def client_command(address: str, bundle: Path, data: Path, state: Path, *extra: str) -> list[str]:
    options = [
        "--aggregator",
        address,
        "--bundle",
        str(bundle),
        "--data",
        str(data),
        "--state-dir",
        str(state),
    ]
    return [FEDPROMPT, "client", "run", *options, *extra]


def start_clients(
    port: int, bundle: Path, tokens: list[str], tmp_path: Path, *policy: str
) -> list[subprocess.Popen]:
    """One real `fedprompt client run` process per token, each on its own generated ImageFolder,
    with the privacy-policy flags given (none: the device's default floor)."""
    clients = []
    for i, token in enumerate(tokens):
        data = write_image_folder(tmp_path / f"d{i}", seed=i)
        command = client_command(f"127.0.0.1:{port}", bundle, data, tmp_path / f"client{i}", *policy)
        command += ["--token", token, "--connect-timeout", "120"]
        clients.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return clients


def run_clients_to_the_end(clients: list[subprocess.Popen], server: AggregatorProcess, rounds: int) -> None:
    """Wait until every client has finished the run and the last round is committed with all of them,
    then stop the aggregator cleanly; on any failure kill every process."""
    try:
        outputs = [client.communicate(timeout=300) for client in clients]
        for client, (out, err) in zip(clients, outputs, strict=True):
            assert client.returncode == 0, err[-3000:] + "\n--- aggregator ---\n" + server.log
            assert f"finished after round {rounds}" in out
        server.wait_for_log(rf"round {rounds}/{rounds} committed: {len(clients)} clients")
        assert server.terminate() == 0
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
        server.kill()


def test_wrong_address_stops_the_client_cli_with_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", seed=0, per_class=2)
    command = client_command(f"127.0.0.1:{closed_port()}", tiny_bundle, data, tmp_path / "state")
    result = subprocess.run(
        [*command, "--token", "t", "--connect-timeout", "1"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: cannot reach the aggregator at 127.0.0.1:"), result.stderr


def test_three_client_processes_train_promptfl_through_a_real_aggregator(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    port = closed_port()
    rounds = {
        "rounds": 2,
        "min_clients": 3,
        "min_fit": 3,
        "min_updates": 3,
        "round_timeout_s": 120.0,
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": 1.0,
        "client_timeout_s": 30.0,
    }
    config = write_config(tmp_path / "aggregator.toml", rounds, {"port": port}, bundle=tiny_bundle)
    config.write_text(
        config.read_text()
        + "\n[training]\nn_ctx = 4\nbatch_size = 8\nlr = 0.01\n"
        + 'dp = "client"\nclip = 1.0\nnoise_multiplier = 1.0\n'
    )
    state = tmp_path / "state.sqlite"
    store = SQLiteStore(state)
    tokens = [store.issue_token(f"device {i}") for i in range(3)]
    store.close()
    # the clients start before the aggregator exists: they must wait for it with backoff
    clients = start_clients(port, tiny_bundle, tokens, tmp_path)
    time.sleep(1.0)
    server = AggregatorProcess(config)
    run_clients_to_the_end(clients, server, rounds=2)

    store = SQLiteStore(state, read_only=True)
    records = store.rounds()
    assert [r.round_id for r in records] == [1, 2]
    assert all(len(r.clients) == 3 for r in records)
    first, second = store.global_tensors(1)["ctx"], store.global_tensors(2)["ctx"]
    assert first.shape[0] == 4 and not np.allclose(first, second)
    for record in records:
        assert 0.0 <= record.metrics["client_metrics"]["accuracy"] <= 1.0
        assert record.metrics["epsilon_max"] > 0
        assert record.metrics["bytes_up_per_client"] <= first.size * 2 + 64  # fp16 on the wire
    kept = load_device_run(tmp_path / "client0")
    assert (kept.method, kept.round_id) == ("promptfl", 2)
    np.testing.assert_array_equal(kept.served["ctx"], second.astype(np.float16).astype(np.float32))
