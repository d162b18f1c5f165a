"""Crashes with real processes: the aggregator is killed with SIGKILL at different moments of a
round and restarted; clients are killed after training. Clients run the real client runtime
(tests/light_clients.py) and must reconnect with backoff and go on, and afterwards no committed
round may be lost or applied twice, no accepted update lost, and no round trained twice."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from aggregator_process import AggregatorProcess, LightClients, free_port, write_config
from light_clients import expected_global

from aggregator.store import SQLiteStore
from edge_client.pending_upload import PENDING_FILE

LEDGER_SERVE = (sys.executable, str(Path(__file__).with_name("ledger_aggregator.py")))
ROUNDS = {
    "min_clients": 3,
    "min_fit": 3,
    "min_updates": 3,
    "round_timeout_s": 60.0,
    "poll_interval_s": 0.2,
    "heartbeat_interval_s": 0.5,
    "client_timeout_s": 5.0,
}


def setup_run(tmp_path: Path, rounds: int, clients: int, bundle: Path) -> tuple[Path, Path]:
    """A config on a fixed free port (restarts reuse it) and a file of enrolment tokens."""
    config = write_config(
        tmp_path / "aggregator.toml",
        {**ROUNDS, "rounds": rounds},
        {"port": free_port(), "update_encoding": "fp32"},
        bundle=bundle,
    )
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token(f"light {i}") for i in range(clients)]
    store.close()
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("\n".join(tokens) + "\n")
    return config, token_file


def client_indices(state: Path) -> dict[str, int]:
    store = SQLiteStore(state, read_only=True)
    return {t.client_id: int(t.label.split()[1]) for t in store.tokens() if t.client_id}


def check_committed_rounds(state: Path, rounds: int) -> list[list[str]]:
    """Every round committed once, its global the exact FedAvg of its clients' prepared updates;
    returns the client lists."""
    store = SQLiteStore(state, read_only=True)
    records = store.rounds()
    assert [r.round_id for r in records] == list(range(1, rounds + 1))
    index = client_indices(state)
    previous = store.global_tensors(0)  # the spec's initial state
    for record in records:
        senders = [index[client] for client in record.metrics["clients"]]
        want = expected_global(previous, senders, record.round_id, "fp32")
        got = store.global_tensors(record.round_id)
        np.testing.assert_allclose(got["ctx"], want, rtol=1e-5, atol=1e-7)
        previous = got
    return [r.metrics["clients"] for r in records]


def test_kill_9_while_sampling_after_some_updates_and_while_aggregating(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    config, tokens = setup_run(tmp_path, rounds=4, clients=3, bundle=tiny_bundle)
    serve = ("--aggregate-s", "1.5")
    servers = [AggregatorProcess(config, *serve, command=LEDGER_SERVE)]
    state = tmp_path / "clients"
    # clients 0 and 1 answer fast, client 2 takes 2 s to "train" (heartbeating meanwhile)
    fast = LightClients(servers[0].address, tokens, state, 0, 2, "--train-s", "0.2", bundle=tiny_bundle)
    slow = LightClients(servers[0].address, tokens, state, 2, 1, "--train-s", "2.0", bundle=tiny_bundle)

    def crash_and_restart() -> AggregatorProcess:
        servers[-1].kill()
        servers.append(AggregatorProcess(config, *serve, command=LEDGER_SERVE))
        return servers[-1]

    try:
        servers[0].wait_for_log(r"round 1/4: sampled")
        crash_and_restart().wait_for_log(r"resuming open round 1 with \d accepted update")
        server = servers[-1]
        server.wait_for_log(r"round 2: update from", times=2)  # the slow client still trains
        crash_and_restart().wait_for_log(r"resuming open round 2 with 2 accepted update")
        servers[-1].wait_for_log(r"round 3: aggregating 3 updates")
        crash_and_restart().wait_for_log(r"resuming open round 3 with 3 accepted update")
        servers[-1].wait_for_log(r"round 4/4 committed", timeout=60)
        assert fast.wait(60) == 0 and slow.wait(60) == 0, fast.log + slow.log
        assert servers[-1].terminate() == 0
    finally:
        for process in (fast, slow, *servers):
            process.kill()

    committed = check_committed_rounds(tmp_path / "state.sqlite", 4)
    assert all(len(clients) == 3 for clients in committed)
    ledger = SQLiteStore(tmp_path / "state.sqlite", read_only=True).latest_round().strategy_state["ledger"]
    assert ledger == committed  # the strategy state went with its rounds: nothing applied twice
    for round_id in range(1, 5):  # each client trained each round once, and was accepted once
        for clients, hosted in ((fast, 2), (slow, 1)):
            assert clients.count(rf"trained round {round_id}$") == hosted
            assert clients.count(rf"round {round_id}: update accepted") == hosted
    assert fast.count(r"aggregator unavailable") + slow.count(r"aggregator unavailable") >= 3


def test_a_client_killed_before_its_upload_sends_the_saved_update_and_does_not_train_again(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    config, tokens = setup_run(tmp_path, rounds=1, clients=3, bundle=tiny_bundle)
    state = tmp_path / "clients"
    server = AggregatorProcess(config)
    others = LightClients(server.address, tokens, state, 0, 2, bundle=tiny_bundle)
    victim = LightClients(server.address, tokens, state, 2, 1, "--train-s", "1.0", bundle=tiny_bundle)
    restarted_victim = restarted_server = None
    try:
        victim.wait_for_log(r"client-2 trained round 1")
        server.kill()  # the aggregator goes away while the victim trains...
        victim.wait_for_log(r"client-2 aggregator unavailable \(upload\)")
        victim.kill()  # ...and the victim dies while retrying its upload
        assert (state / "client-2" / PENDING_FILE).exists()
        restarted_server = AggregatorProcess(config)
        restarted_victim = LightClients(
            restarted_server.address, tokens, state, 2, 1, "--train-s", "1.0", bundle=tiny_bundle
        )
        restarted_victim.wait_for_log(r"client-2 round 1: sending the update trained before a restart")
        restarted_server.wait_for_log(r"round 1/1 committed: 3 clients")
        assert restarted_victim.wait(30) == 0 and others.wait(30) == 0
        assert restarted_server.terminate() == 0
    finally:
        for process in (others, victim, server, restarted_victim, restarted_server):
            if process is not None:
                process.kill()
    assert victim.count("trained round 1") + restarted_victim.count("trained round 1") == 1
    assert not (state / "client-2" / PENDING_FILE).exists()
    check_committed_rounds(tmp_path / "state.sqlite", 1)
