"""Secure aggregation over the network with real processes: the `fedprompt aggregator serve`
daemon and light clients running the real client runtime (tests/light_clients.py), some of which
crash between two secure-aggregation steps. The committed global model must be the plain weighted
FedAvg of exactly the clients the protocol kept, within the quantisation error; past the threshold
the attempt fails with one clear line and nothing is committed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from aggregator_process import AggregatorProcess, LightClients, free_port, write_config
from light_clients import expected_global

from aggregator.store import SQLiteStore
from fedprompt.common.secagg import Quantizer

CLIENTS, THRESHOLD, BOUND = 7, 4, 4.0
ROUNDS = {
    "min_clients": CLIENTS,
    "min_fit": CLIENTS,
    "min_updates": THRESHOLD,
    "round_timeout_s": 60.0,
    "poll_interval_s": 0.2,
    "heartbeat_interval_s": 0.5,
    "client_timeout_s": 3.0,
}
SECURE = f"""
[secure_aggregation]
enabled = true
threshold = {THRESHOLD}
value_bound = {BOUND}
example_cap = 20
step_timeout_s = 30.0
"""


def setup_run(tmp_path: Path, rounds: int, bundle: Path) -> tuple[Path, Path]:
    config = write_config(
        tmp_path / "aggregator.toml", {**ROUNDS, "rounds": rounds}, {"update_encoding": "fp32"}, bundle=bundle
    )
    config.write_text(config.read_text() + SECURE)
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token(f"light {i}") for i in range(CLIENTS)]
    store.close()
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("\n".join(tokens) + "\n")
    return config, token_file


def start_clients(
    address: str, tokens: Path, state: Path, crash: dict[int, tuple[int, int]], bundle: Path
) -> list[LightClients]:
    """The clients not in `crash` share one process; each crashing one (round, step) has its own."""
    steady = [i for i in range(CLIENTS) if i not in crash]
    groups = [LightClients(address, tokens, state, steady[0], len(steady), bundle=bundle)]
    for index, (round_id, step) in sorted(crash.items()):
        where = ("--crash-round", str(round_id), "--crash-after-step", str(step))
        groups.append(LightClients(address, tokens, state, index, 1, *where, bundle=bundle))
    return groups


def index_of(state: Path) -> dict[str, int]:
    store = SQLiteStore(state, read_only=True)
    return {t.client_id: int(t.label.split()[1]) for t in store.tokens() if t.client_id}


def test_the_sum_is_the_plain_weighted_mean_and_survives_dropouts_between_steps(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    config, tokens = setup_run(tmp_path, rounds=2, bundle=tiny_bundle)
    server = AggregatorProcess(config)
    # in round 2, clients 5 and 6 die after sharing their keys, before uploading their masked input:
    # n - 1 - threshold = 2 dropouts are tolerated (threshold 4: a majority of 7)
    clients = start_clients(server.address, tokens, tmp_path / "clients", {5: (2, 1), 6: (2, 1)}, tiny_bundle)
    try:
        server.wait_for_log(r"round 2/2 committed", timeout=120)
        assert clients[0].wait(30) == 0, clients[0].log
        assert [group.wait(10) for group in clients[1:]] == [17, 17]
        assert server.terminate() == 0
    finally:
        for process in (server, *clients):
            process.kill()

    state = tmp_path / "state.sqlite"
    store = SQLiteStore(state, read_only=True)
    index = index_of(state)
    previous = store.global_tensors(0)  # the spec's initial state
    for record, kept in zip(store.rounds(), (list(range(7)), [0, 1, 2, 3, 4]), strict=True):
        assert sorted(index[c] for c in record.metrics["clients"]) == kept
        session = record.metrics["secure_aggregation"]
        assert (session["members"], session["survivors"]) == (CLIENTS, len(kept))
        assert session["dropped_after_sharing"] == CLIENTS - len(kept)
        assert all(c.num_examples == 0 and not c.metrics for c in record.clients)  # nothing per client
        got = store.global_tensors(record.round_id)["ctx"]
        want = expected_global(previous, kept, record.round_id, "fp32")
        weights = sum(10 + i % 7 for i in kept) / 20
        error = Quantizer(BOUND, CLIENTS).error_bound(len(kept), stochastic=True)
        assert np.abs(got - want).max() <= 2 * error * (1 + np.abs(want).max()) / weights + 1e-7
        assert np.abs(got - want).max() > 0  # it did go through quantisation: not the plain mean
        assert abs(record.metrics["client_metrics"]["accuracy"] - 0.5) < 1e-6  # summed, not sent
        previous = {"ctx": got}


def test_one_dropout_past_the_threshold_fails_the_attempt_clearly_and_commits_nothing(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    config, tokens = setup_run(tmp_path, rounds=1, bundle=tiny_bundle)
    server = AggregatorProcess(config)
    # 3 of 7 die after uploading their masked input: a survivor's seed has 3 shares left, threshold 4
    crash = {index: (1, 2) for index in (4, 5, 6)}
    clients = start_clients(server.address, tokens, tmp_path / "clients", crash, tiny_bundle)
    try:
        server.wait_for_log(r"secure aggregation attempt 1 failed: unmask: too many dropouts", timeout=120)
        assert [group.wait(10) for group in clients[1:]] == [17, 17, 17]
        clients[0].wait_for_log(r"session ended without this client: unmask: too many dropouts", times=2)
        assert server.proc.poll() is None  # the daemon goes on, waiting for enough live clients
        assert server.terminate() == 0
    finally:
        for process in (server, *clients):
            process.kill()
    assert "Traceback" not in server.log
    assert SQLiteStore(tmp_path / "state.sqlite", read_only=True).rounds() == []


def test_a_daemon_killed_mid_session_runs_the_round_again_with_fresh_keys_without_retraining(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    config, tokens = setup_run(tmp_path, rounds=1, bundle=tiny_bundle)
    # clients reconnect with backoff while the new daemon starts: on a busy machine that can take
    # longer than 3 s, and a client declared silent would make a second attempt of the round
    text = config.read_text().replace("port = 0", f"port = {free_port()}")
    config.write_text(text.replace("client_timeout_s = 3.0", "client_timeout_s = 12.0"))
    assert "client_timeout_s = 12.0" in config.read_text()
    servers = [AggregatorProcess(config)]
    # client 6 dies after advertising its keys, so the share-keys step stays open for client_timeout_s
    # and no masked input has left a device when the daemon dies
    clients = start_clients(servers[0].address, tokens, tmp_path / "clients", {6: (1, 0)}, tiny_bundle)
    try:
        clients[0].wait_for_log(r"secure aggregation: advertise keys sent", times=6)
        servers[0].kill()
        servers.append(AggregatorProcess(config))
        servers[1].wait_for_log(r"round 1/1 committed", timeout=120)
        assert clients[0].wait(30) == 0, clients[0].log
        assert servers[1].terminate() == 0
    finally:
        for process in (*servers, *clients):
            process.kill()
    assert "resuming open round 1" in servers[1].log
    assert "secure aggregation attempt 1 with 7 clients" in servers[1].log  # a new session, new keys
    for index in range(6):
        assert clients[0].count(rf"client-{index} trained round 1") == 1
        assert clients[0].count(rf"client-{index} round 1: sending the update trained before a restart") == 1
    state = tmp_path / "state.sqlite"
    (record,) = SQLiteStore(state, read_only=True).rounds()
    assert sorted(index_of(state)[c] for c in record.metrics["clients"]) == list(range(6))
    got = SQLiteStore(state, read_only=True).global_tensors(1)["ctx"]
    want = expected_global(SQLiteStore(state, read_only=True).global_tensors(0), range(6), 1, "fp32")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_attempt_that_fails_after_masked_inputs_went_out_is_retried_only_with_fresh_training(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    config, tokens = setup_run(tmp_path, rounds=1, bundle=tiny_bundle)
    server = AggregatorProcess(config)
    # 4 of 7 die after uploading their masked input: 3 survivors sign, fewer than the threshold 4
    crash = {index: (1, 2) for index in (3, 4, 5, 6)}
    clients = start_clients(server.address, tokens, tmp_path / "clients", crash, tiny_bundle)
    try:
        server.wait_for_log(r"attempt 1 failed: survivor signature: only 3 survivors signed", timeout=120)
        assert [group.wait(20) for group in clients[1:]] == [17] * 4
        back = LightClients(
            server.address, tokens, tmp_path / "clients", 3, 4, bundle=tiny_bundle
        )  # restarted, same state
        server.wait_for_log(r"round 1/1 committed", timeout=120)
        assert clients[0].wait(30) == 0 and back.wait(30) == 0
        assert server.terminate() == 0
    finally:
        for process in (server, *clients):
            process.kill()
    logs = "\n".join(group.log for group in (*clients, back))
    state = tmp_path / "state.sqlite"
    (record,) = SQLiteStore(state, read_only=True).rounds()
    summed = sorted(index_of(state)[c] for c in record.metrics["clients"])
    assert {0, 1, 2} <= set(summed) and len(summed) >= 5  # whoever of 3..6 came back in time
    assert record.metrics["secure_aggregation"]["attempts"] >= 2
    assert "sending the update trained before a restart" not in logs
    for index in summed:
        # the update whose masked input went out is never summed again: each trained afresh
        mine = "\n".join(line for line in logs.splitlines() if line.startswith(f"client-{index} "))
        assert mine.count("trained round 1") == 2, mine
        assert "training afresh (a second sum of the same update would reveal it)" in mine
