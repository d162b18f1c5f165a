"""A real aggregator process on loopback, driven by raw protocol clients: FedAvg math on the stored
global model, every refusal of the wire contract, the status read API, and resume after kill -9."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from aggregator_process import FEDPROMPT, AggregatorProcess, RawClient, write_config

from aggregator.store import SQLiteStore
from fedprompt.common.codec import decode_tensor_set, encode_tensor_set
from protos import fedprompt_pb2 as pb

FAST_ROUNDS = {
    "rounds": 3,
    "min_clients": 3,
    "min_fit": 3,
    "min_updates": 3,
    "round_timeout_s": 20.0,
    "poll_interval_s": 0.1,
    "heartbeat_interval_s": 0.5,
    "client_timeout_s": 5.0,
}
EXACT = {"update_encoding": "fp32"}
EXAMPLES = {0: 10, 1: 20, 2: 30}


def issue_tokens(state: Path, count: int) -> list[str]:
    store = SQLiteStore(state)
    try:
        return [store.issue_token(f"device {i}") for i in range(count)]
    finally:
        store.close()


def client_ctx(index: int, round_id: int, start: dict[str, np.ndarray]) -> np.ndarray:
    """A client's 'trained' prompt: the global it got plus a known per-client step."""
    step = np.arange(16 * 64, dtype=np.float32).reshape(16, 64) / 1e4  # n_ctx 16, the bundle's width 64
    return (start["ctx"] + (index + 1) * round_id * step).astype(np.float32)


@pytest.fixture
def tokens_and_config(tmp_path: Path, tiny_bundle: Path) -> tuple[list[str], Path]:
    config = write_config(tmp_path / "aggregator.toml", FAST_ROUNDS, EXACT, bundle=tiny_bundle)
    return issue_tokens(tmp_path / "state.sqlite", 4), config


def push_prepared(client: RawClient, index: int, expected_round: int) -> np.ndarray:
    """The client pulls its task and pushes its prepared update; returns the ctx it sent."""
    header, tensors = client.wait_for_task()
    assert header.status == pb.TRAIN and header.round_id == expected_round
    settings = json.loads(header.settings_json)
    assert header.method == "promptfl" and settings["core"]["n_ctx"] == 16
    assert set(settings) == {"core", "client"}  # the server section stays on the server
    assert len(header.bundle_digest) == 64  # the run's bundle (sha256 of its manifest)
    assert header.deadline_unix > 0 and header.update_encoding == pb.FP32
    assert 0 < header.deadline_in_s <= FAST_ROUNDS["round_timeout_s"]
    assert header.client_timeout_s == FAST_ROUNDS["client_timeout_s"]
    beat = client.heartbeat(expected_round)  # says how long the round still has, extensions included
    assert beat.round_open and 0 < beat.deadline_in_s <= header.deadline_in_s
    ctx = client_ctx(index, expected_round, tensors)
    reply = client.push(expected_round, {"ctx": ctx}, EXAMPLES[index], {"accuracy": 0.5 + index / 10})
    assert reply.accepted
    return ctx


def fedavg(sent: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """The expected global ctx: the mean of what client `index` sent, weighted by EXAMPLES[index]."""
    total = sum(EXAMPLES[index] for index in sent)
    return {"ctx": sum(EXAMPLES[index] * ctx.astype(np.float64) for index, ctx in sent.items()) / total}


def play_round(clients: list[RawClient], expected_round: int) -> dict[str, np.ndarray]:
    """Every client pulls its task and pushes its prepared update; returns the expected FedAvg."""
    return fedavg(
        {index: push_prepared(client, index, expected_round) for index, client in enumerate(clients)}
    )


def test_rounds_average_by_example_count_and_refuse_bad_updates(tokens_and_config, tmp_path: Path) -> None:
    tokens, config = tokens_and_config
    server = AggregatorProcess(config)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            RawClient(server.address, "no-such-token")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        clients = [RawClient(server.address, token) for token in tokens[:3]]

        expected = play_round(clients, 1)
        # round 1 is closed now: a late or replayed update is refused with a clear status
        server.wait_for_log(r"round 1/3 committed")
        assert not clients[0].heartbeat(1).round_open
        with pytest.raises(grpc.RpcError) as closed:
            clients[0].push(1, {"ctx": expected["ctx"].astype(np.float32)}, 5)
        assert closed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "round 1 is closed" in closed.value.details()

        # round 2: try every kind of bad update before the good ones
        _, tensors = clients[0].wait_for_task()
        good = client_ctx(0, 2, tensors)
        bad_updates = {
            "wrong shape": dict(tensors={"ctx": np.zeros((16, 9), np.float32)}, num_examples=1),
            "extra tensor": dict(tensors={"ctx": good, "x": np.zeros(1, np.float32)}, num_examples=1),
            "no examples": dict(tensors={"ctx": good}, num_examples=0),
            "garbage payload": dict(tensors={}, num_examples=1, payload=b"\x0a\xff\xff\x00"),
            "NaN payload": dict(
                tensors={},
                num_examples=1,
                payload=pb.TensorSet(
                    tensors=[
                        pb.Tensor(
                            name="ctx",
                            dtype="float32",
                            shape=[4, 8],
                            encoding=pb.FP32,
                            data=np.full(32, np.nan, np.float32).tobytes(),
                        )
                    ]
                ).SerializeToString(),
            ),
            "NaN metric": dict(tensors={"ctx": good}, num_examples=1, metrics={"accuracy": float("nan")}),
        }
        for reason, update in bad_updates.items():
            with pytest.raises(grpc.RpcError) as invalid:
                clients[0].push(2, **update)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT, reason
        with pytest.raises(grpc.RpcError) as too_big:
            clients[0].push(2, {"ctx": good}, 1, payload=b"x" * (5 * 2**20), chunk_bytes=5 * 2**20)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as outsider:
            RawClient(server.address, tokens[3]).push(2, {"ctx": good}, 1)
        assert "not sampled" in outsider.value.details()

        expected_2 = play_round(clients, 2)
        with pytest.raises(grpc.RpcError) as duplicate:
            clients[2].push(2, {"ctx": good}, 1)
        assert duplicate.value.code() in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION)
        expected_3 = play_round(clients, 3)

        assert clients[1].wait_for_task()[0].status == pb.FINISHED
        model_header, final = clients[1].fetch_global()
        assert model_header.round_id == 3 and model_header.finished
        served = encode_tensor_set({"ctx": expected_3["ctx"].astype(np.float32)}, "fp16")  # the default
        np.testing.assert_allclose(final["ctx"], decode_tensor_set(served)["ctx"], rtol=1e-6)
        assert server.proc.poll() is None, "the daemon keeps serving the final model"
        assert server.terminate() == 0
    finally:
        server.kill()

    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    for round_id, want in ((1, expected), (2, expected_2), (3, expected_3)):
        np.testing.assert_allclose(store.global_tensors(round_id)["ctx"], want["ctx"], rtol=1e-6)
    records = store.rounds()
    assert [r.round_id for r in records] == [1, 2, 3]
    first = records[0]
    assert first.metrics["num_examples"] == 60 and len(first.clients) == 3
    mean_accuracy = (10 * 0.5 + 20 * 0.6 + 30 * 0.7) / 60
    assert first.metrics["client_metrics"]["accuracy"] == pytest.approx(mean_accuracy)
    assert first.metrics["bytes_up_per_client"] == len(encode_tensor_set({"ctx": expected["ctx"]}, "fp32"))
    # round 1: the initial prompt; tasks travel in fp16 by default
    sent_down = len(encode_tensor_set({"ctx": expected["ctx"]}, "fp16"))
    assert first.metrics["bytes_down_per_client"] == records[1].metrics["bytes_down_per_client"] == sent_down

    status = subprocess.run(
        [FEDPROMPT, "aggregator", "status", "--config", str(config), "--json"], capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    assert [row["num_examples"] for row in json.loads(status.stdout)["rounds"]] == [60, 60, 60]


def test_kill_9_mid_round_resumes_the_open_round_with_its_accepted_updates(
    tokens_and_config, tmp_path: Path
) -> None:
    tokens, config = tokens_and_config
    server = AggregatorProcess(config)
    try:
        clients = [RawClient(server.address, token) for token in tokens[:3]]
        expected_1 = play_round(clients, 1)
        server.wait_for_log(r"round 1/3 committed")
        early = push_prepared(clients[0], 0, 2)
        server.proc.kill()  # SIGKILL with one update of round 2 accepted, the round not committed
        server.proc.wait(10)
    finally:
        server.kill()

    config.write_text(config.read_text().replace("port = 0", f"port = {server.port}"))
    restarted = AggregatorProcess(config)
    try:
        restarted.wait_for_log(r"resuming run .* after committed round 1")
        restarted.wait_for_log(r"resuming open round 2 with 1 accepted update")
        for client in clients:  # same sessions, same address: they go on where they were
            client.channel.close()
            client.channel = grpc.insecure_channel(restarted.address)
            client.stub = type(client.stub)(client.channel)
        assert clients[0].pull()[0].status == pb.WAIT  # its update survived the crash
        with pytest.raises(grpc.RpcError) as replay:
            clients[0].push(2, {"ctx": early}, EXAMPLES[0])
        assert replay.value.code() == grpc.StatusCode.ALREADY_EXISTS
        expected_2 = fedavg(
            {0: early, 1: push_prepared(clients[1], 1, 2), 2: push_prepared(clients[2], 2, 2)}
        )
        expected_3 = play_round(clients, 3)
        restarted.wait_for_log(r"round 3/3 committed")
        assert restarted.terminate() == 0
    finally:
        restarted.kill()

    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    assert [r.round_id for r in store.rounds()] == [1, 2, 3]
    assert all(len(r.clients) == 3 for r in store.rounds())
    for round_id, want in ((1, expected_1), (2, expected_2), (3, expected_3)):
        np.testing.assert_allclose(store.global_tensors(round_id)["ctx"], want["ctx"], rtol=1e-6)


def test_a_silent_client_is_skipped_once_it_stops_heartbeating(tmp_path: Path, tiny_bundle: Path) -> None:
    rounds = {**FAST_ROUNDS, "rounds": 1, "min_updates": 2, "min_fit": 3, "client_timeout_s": 1.5}
    config = write_config(tmp_path / "aggregator.toml", rounds, EXACT, bundle=tiny_bundle)
    tokens = issue_tokens(tmp_path / "state.sqlite", 3)
    server = AggregatorProcess(config)
    try:
        clients = [RawClient(server.address, token) for token in tokens]
        silent = clients.pop()
        assert silent.wait_for_task()[0].status == pb.TRAIN  # sampled, then never answers
        for index, client in enumerate(clients):
            header, tensors = client.wait_for_task()
            assert client.push(header.round_id, {"ctx": client_ctx(index, 1, tensors)}, 10).accepted
        server.wait_for_log(r"round 1/1 committed: 2 clients", timeout=15)
        assert server.terminate() == 0
    finally:
        server.kill()


def test_bad_configs_and_token_commands_answer_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[rounds]\nminclients = 3\n")
    result = subprocess.run(
        [FEDPROMPT, "aggregator", "serve", "--config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: unknown key(s) in [rounds]: minclients; known: rounds, min_clients,")
    state = str(tmp_path / "s.sqlite")
    issued = subprocess.run(
        [FEDPROMPT, "aggregator", "token", "issue", "--state", state, "--count", "2"],
        capture_output=True,
        text=True,
    )
    first, second = issued.stdout.split()
    assert (
        subprocess.run(
            [FEDPROMPT, "aggregator", "token", "revoke", "--state", state, first.split(".")[0]]
        ).returncode
        == 0
    )
    listing = subprocess.run(
        [FEDPROMPT, "aggregator", "token", "list", "--state", state], capture_output=True, text=True
    )
    assert "revoked" in listing.stdout and "active" in listing.stdout and second not in listing.stdout
    store = SQLiteStore(state)
    with pytest.raises(Exception, match="revoked"):
        store.enroll(first, "x")
    client_id, session = store.enroll(second, "y")
    assert store.client_for_session(session) == client_id


def test_the_documented_example_config_is_valid_and_flags_override_it(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    from aggregator.config import load_config

    example = Path(__file__).resolve().parents[1] / "aggregator" / "aggregator.example.toml"
    text = example.read_text()
    assert 'bundle = "bundle/manifest.json"' in text
    (tmp_path / "bundle").symlink_to(tiny_bundle)  # where the example expects the run's bundle
    (tmp_path / "aggregator.toml").write_text(text)
    config = load_config(tmp_path / "aggregator.toml")
    assert config.server.port == 50051 and config.settings.core.dp == "client"
    overridden = config.with_overrides({"port": 6000, "host": None}, {"rounds": 2, "min_clients": None})
    assert (overridden.server.port, overridden.rounds.rounds, overridden.rounds.min_clients) == (6000, 2, 2)
