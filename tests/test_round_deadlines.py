"""Deadlines and liveness with real client processes: a client whose training outlasts
client_timeout_s but who heartbeats is waited for, one that outlasts the round's deadline has its
late update refused with a clear status, and neither is ever declared dead."""

from __future__ import annotations

from pathlib import Path

from aggregator_process import AggregatorProcess, LightClients, write_config

from aggregator.store import SQLiteStore
from edge_client.pending_upload import PENDING_FILE


def test_a_slow_heartbeating_client_is_waited_for_and_a_late_update_is_refused(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    rounds = {
        "rounds": 1,
        "min_clients": 3,
        "min_fit": 3,
        "min_updates": 2,
        "round_timeout_s": 5.0,
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": 0.4,
        "client_timeout_s": 1.5,
    }
    config = write_config(tmp_path / "aggregator.toml", rounds, bundle=tiny_bundle)
    store = SQLiteStore(tmp_path / "state.sqlite")
    (tmp_path / "tokens").write_text("\n".join(store.issue_token(f"light {i}") for i in range(3)))
    store.close()
    server = AggregatorProcess(config)
    state, tokens = tmp_path / "clients", tmp_path / "tokens"
    quick = LightClients(server.address, tokens, state, 0, 1, bundle=tiny_bundle)
    slow = LightClients(
        server.address, tokens, state, 1, 1, "--train-s", "3.0", bundle=tiny_bundle
    )  # 2x client_timeout_s
    late = LightClients(
        server.address, tokens, state, 2, 1, "--train-s", "7.0", bundle=tiny_bundle
    )  # past the deadline
    try:
        server.wait_for_log(r"round 1/1 committed: 2 clients", timeout=30)
        late.wait_for_log(r"client-2-heartbeat round 1 closed while this client trains")
        late.wait_for_log(r"client-2 round 1: update refused \(FAILED_PRECONDITION: round 1 is closed\)")
        assert quick.wait(30) == 0 and slow.wait(30) == 0 and late.wait(30) == 0
        assert server.terminate() == 0
    finally:
        for process in (quick, slow, late, server):
            process.kill()
    assert server.count("silent for over") == 0  # heartbeats kept both slow clients live
    assert late.count("round 1 closed while this client trains") == 1
    assert server.count(r"PushUpdate refused for .*: round 1 is closed") == 1
    (record,) = SQLiteStore(tmp_path / "state.sqlite", read_only=True).rounds()
    index = {t.client_id: t.label for t in SQLiteStore(tmp_path / "state.sqlite", read_only=True).tokens()}
    assert sorted(index[c] for c in record.metrics["clients"]) == ["light 0", "light 1"]
    assert record.metrics["duration_s"] >= rounds["round_timeout_s"]  # it waited for the late one
    assert not (state / "client-2" / PENDING_FILE).exists()  # a refusal is an answer: nothing kept
