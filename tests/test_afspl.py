"""AFSPL as a method (spec + client half + server half) through the real aggregator and real
`fedprompt client run` processes on captioned data folders: the daemon runs it to the end under
sample-level DP and each device leaves a prompt file `fedprompt caption` reads; a recording of every
byte the aggregator receives shows only K rows (and their numbers) per client per round, never the
local prompt, gate or modality generator, and the committed global prompt is the per-row average of
what was received."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from aggregator_process import FEDPROMPT, AggregatorProcess, write_config
from PIL import Image
from test_federated import client_command
from test_secfpp_wire import WireRecorder, row_patterns

from aggregator.config import ConfigError, load_config
from aggregator.rounds import RoundCoordinator
from aggregator.server import AggregatorService, add_service, grpc_message_options
from aggregator.store import SQLiteStore
from aggregator.strategies.afspl import AFSPLStrategy, row_numbers
from aggregator.strategies.row_average import average_rows
from edge_client.caption_prompts import FUSED_KEYS, load_prompt_parts
from edge_client.methods.local_state import METHOD_STATE_DIR, load_tensors
from fedprompt.common.codec import decode_tensor_set, join_chunks
from fedprompt.common.methods import RunSettings
from fedprompt.common.settings import SettingsError
from protos import fedprompt_pb2 as pb

CLIENTS, ROUNDS, TOKENS, K = 2, 2, 8, 3  # K = ceil(0.3 * 8)
CAPTIONS = ("a red bag on the left", "two blue shoe at the top", "the bag at the bottom right")
ROUND_RULES = {
    "rounds": ROUNDS,
    "min_clients": CLIENTS,
    "min_fit": CLIENTS,
    "min_updates": CLIENTS,
    "round_timeout_s": 240.0,
    "poll_interval_s": 0.2,
    "heartbeat_interval_s": 1.0,
    "client_timeout_s": 60.0,
}
TRAINING = 'lr = 0.05\noptimizer = "adam"\nbatch_size = 4\nnoise_multiplier = 1.0\nclip = 1.0\n'


def write_captioned_folder(root: Path, seed: int, n: int = 10) -> Path:
    """`n` small images, each captioned (captions.txt) by its pattern."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    lines = []
    for i in range(n):
        kind = i % len(CAPTIONS)
        pixels = rng.integers(0, 60, (32, 32, 3))
        pixels[:, kind * 10 : kind * 10 + 10] += 180
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png\t{CAPTIONS[kind]}")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def afspl_config(tmp_path: Path, bundle: Path, dp: str, server: dict | None = None) -> Path:
    config = write_config(tmp_path / "aggregator.toml", ROUND_RULES, server, bundle=bundle, method="afspl")
    config.write_text(
        config.read_text() + f'\n[training]\n{TRAINING}dp = "{dp}"\n[afspl]\nprompt_tokens = {TOKENS}\n'
    )
    return config


def start_clients(address: str, bundle: Path, tokens: list[str], tmp_path: Path) -> list[subprocess.Popen]:
    clients = []
    for i, token in enumerate(tokens):
        data = write_captioned_folder(tmp_path / f"data{i}", seed=i)
        command = client_command(address, bundle, data, tmp_path / f"client{i}", "--token", token)
        clients.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return clients


def finish(clients: list[subprocess.Popen], log: str = "") -> None:
    try:
        for client in clients:
            out, err = client.communicate(timeout=300)
            assert client.returncode == 0, err[-3000:] + log
            assert f"finished after round {ROUNDS}" in out and "fedprompt caption" in out
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()


def test_the_daemon_runs_afspl_with_sample_level_dp_and_the_device_captions_with_its_prompts(
    caption_bundle: Path, tmp_path: Path
) -> None:
    config = afspl_config(tmp_path, caption_bundle, "sample")
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token(f"device {i}") for i in range(CLIENTS)]
    store.close()
    server = AggregatorProcess(config)
    try:
        finish(start_clients(server.address, caption_bundle, tokens, tmp_path), server.log)
        server.wait_for_log(rf"round {ROUNDS}/{ROUNDS} committed: {CLIENTS} clients")
        assert server.terminate() == 0
    finally:
        server.kill()
    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    records = store.rounds()
    assert [len(r.clients) for r in records] == [CLIENTS] * ROUNDS
    for record in records:
        assert record.metrics["epsilon_max"] > 0 and record.metrics["strategy"]["uploads_ignored"] == 0
        assert K <= record.metrics["strategy"]["rows_moved"] <= min(TOKENS, CLIENTS * K)
        assert record.metrics["client_metrics"]["caption_loss"] > 0
        assert all(c.privacy["sample_rate"] < 1 for c in record.clients)  # DP-SGD, not one noisy step
    assert store.global_tensors(ROUNDS)["global"].shape == (TOKENS, 32)

    state = tmp_path / "client0"
    parts = load_prompt_parts(state)
    assert set(parts) == set(FUSED_KEYS) and parts["global"].shape == (TOKENS, 32)
    images = sorted((tmp_path / "data0").glob("*.png"))[:2]
    result = subprocess.run(
        [FEDPROMPT, "caption", "--bundle", str(caption_bundle), "--state-dir", str(state), *map(str, images)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == list(map(str, images))


def received_updates(recorder: WireRecorder) -> list[tuple[pb.UpdateHeader, dict[str, np.ndarray]]]:
    """(header, decoded tensors) of every update pushed, in arrival order."""
    streams: dict[int, list[pb.UpdateChunk]] = {}
    found = []
    chunks = [pb.UpdateChunk.FromString(data) for method, data in recorder.requests if method == "PushUpdate"]
    for chunk in chunks:
        if chunk.HasField("header"):
            streams[len(found)] = [chunk]
            found.append(chunk)
        else:
            streams[len(found) - 1].append(chunk)
    updates = []
    for parts in streams.values():
        header = parts[0].header
        payload = join_chunks((c.data for c in parts[1:]), header.payload_bytes, 1 << 30)
        updates.append((header, decode_tensor_set(payload)))
    return updates


def test_only_k_rows_per_client_and_round_travel_and_no_local_part_ever_does(
    caption_bundle: Path, tmp_path: Path
) -> None:
    config = load_config(afspl_config(tmp_path, caption_bundle, "client", {"update_encoding": "fp32"}))
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
    try:
        finish(start_clients(f"127.0.0.1:{port}", caption_bundle, tokens, tmp_path))
    finally:
        coordinator.stop()
        server.stop(0)
        driver.join(10)

    updates = received_updates(recorder)
    assert sorted(h.round_id for h, _ in updates) == sorted([1, 2] * CLIENTS)
    for _, tensors in updates:  # K rows and their numbers, nothing else
        assert {n: t.shape for n, t in tensors.items()} == {"rows": (K, 32), "indices": (K,)}
        assert row_numbers(tensors["indices"], TOKENS) is not None
    for round_id in (1, 2):  # the committed prompt is the per-row average of what arrived
        before = store.global_tensors(round_id - 1)["global"]
        sent = [
            (row_numbers(t["indices"], TOKENS), t["rows"], float(h.num_examples))
            for h, t in updates
            if h.round_id == round_id
        ]
        expected, senders = average_rows(before, sent)
        after = store.global_tensors(round_id)["global"]
        np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(after[senders == 0], before[senders == 0])  # unsent rows stay

    wire = [data for _, data in recorder.requests]
    for i in range(CLIENTS):
        (state_file,) = (tmp_path / f"client{i}" / METHOD_STATE_DIR).glob("afspl-*.tensors")
        local = load_tensors(state_file)
        assert set(local) == {"local", "gate_weight", "gate_bias", "modality_weight", "modality_bias"}
        for name in ("local", "gate_weight", "modality_weight"):
            patterns = row_patterns(local[name])
            assert any(p in state_file.read_bytes() for p in patterns)  # the search finds them where they are
            assert not any(p in data for p in patterns for data in wire), f"client {i}'s {name} on the wire"


def test_the_spec_sizes_the_upload_and_the_server_refuses_robust_rules() -> None:
    settings = RunSettings.from_flat("afspl", {"prompt_tokens": 16})
    assert settings.client.rows_sent == 5  # 30% of 16 rows, rounded up
    with pytest.raises(SettingsError, match="gate"):
        RunSettings.from_flat("afspl", {"gate": "sigmoid"})
    from aggregator.strategies.combine import UpdateCombiner

    with pytest.raises(ConfigError, match="averages each prompt row"):
        AFSPLStrategy(settings, UpdateCombiner("median"))
    assert row_numbers(np.array([0.0, 2.0, 2.0]), 4) is None  # a row twice
    assert row_numbers(np.array([0.0, 4.0]), 4) is None and row_numbers(np.array([0.5]), 4) is None
