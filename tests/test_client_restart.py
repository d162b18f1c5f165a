"""A real `fedprompt client run` with client-level DP, killed with SIGKILL after its first round and
started again on the same state folder: it goes on without a token, and its epsilon continues
from what it had spent (opacus' accountant over every round it paid for), never from zero."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator_process import AggregatorProcess, LoggedProcess, free_port, write_config
from independent_accounting import assert_tight
from test_federated import client_command, write_image_folder

from aggregator.store import SQLiteStore


def test_a_client_killed_and_restarted_continues_its_epsilon(tiny_bundle: Path, tmp_path: Path) -> None:
    rounds = {
        "rounds": 3,
        "min_clients": 1,
        "min_fit": 1,
        "min_updates": 1,
        "round_timeout_s": 300.0,
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": 1.0,
        "client_timeout_s": 60.0,
    }
    config = write_config(tmp_path / "aggregator.toml", rounds, {"port": free_port()}, bundle=tiny_bundle)
    config.write_text(
        config.read_text()
        + '\n[training]\nn_ctx = 4\nbatch_size = 8\ndp = "client"\nnoise_multiplier = 1.0\n'
    )
    store = SQLiteStore(tmp_path / "state.sqlite")
    token = store.issue_token("device")
    store.close()
    server = AggregatorProcess(config)
    data, state = write_image_folder(tmp_path / "data", seed=0), tmp_path / "device"
    command = client_command(server.address, tiny_bundle, data, state, "--connect-timeout", "120")
    first = LoggedProcess([*command, "--token", token])
    second = None
    try:
        server.wait_for_log(r"round 1/3 committed", timeout=240)
        first.kill()  # kill -9, possibly while it trains round 2
        second = LoggedProcess(command)  # no token: its enrolment is in the state folder
        assert second.wait(240) == 0, second.log[-3000:]
        server.wait_for_log(r"round 3/3 committed")
        assert server.terminate() == 0
    finally:
        for process in (first, second, server):
            if process is not None:
                process.kill()
    assert second.count(r"enrolled as") == 0  # it went on with its saved session
    reported = [r.clients[0].privacy for r in SQLiteStore(tmp_path / "state.sqlite", read_only=True).rounds()]
    epsilons = [privacy["epsilon"] for privacy in reported]
    assert epsilons[0] < epsilons[1] < epsilons[2]  # a reset would report round 1's epsilon again
    history = json.loads((state / "privacy_accountant.json").read_text())["history"]
    assert sum(steps for *_, steps in history) >= 3  # every round it paid for, including a lost one
    assert_tight(epsilons[2], history, reported[2]["delta"])
    assert_tight(epsilons[0], [[0.5, 1.0, 1]], reported[0]["delta"])
