"""DP-FPL and pFedMoAP end to end: a real aggregator daemon and two real client processes over
loopback for two rounds. Only prompts cross the network (per-client upload sizes in the store); the
personal parts (DP-FPL's local prompt, pFedMoAP's gating network) stay in the devices' state
folders; DP-FPL's global DP epsilon is in the round metrics; pFedMoAP's pool is in the state."""

from __future__ import annotations

from pathlib import Path

import pytest
from aggregator_process import AggregatorProcess, write_config
from independent_accounting import assert_tight
from test_federated import closed_port, run_clients_to_the_end, start_clients

from aggregator.store import RoundRecord, SQLiteStore
from aggregator.strategies.expert_pool import PromptPool
from edge_client.methods.local_state import METHOD_STATE_DIR

N_CTX, WIDTH = 4, 64  # the tiny test bundle's text width
ROUNDS = {
    "rounds": 2,
    "min_clients": 2,
    "min_fit": 2,
    "min_updates": 2,
    "round_timeout_s": 120.0,
    "poll_interval_s": 0.2,
    "heartbeat_interval_s": 1.0,
    "client_timeout_s": 30.0,
}


def check_dpfpl(records: list[RoundRecord], final: RoundRecord) -> None:
    for record in records:  # global DP sigma_g = 2: accounted at sigma_g / 2 = 1, q = 1, once per round
        assert_tight(record.metrics["strategy"]["global_epsilon"], [(1.0, 1.0, record.round_id)], 1e-5)
        assert record.metrics["epsilon_max"] > 0  # the devices' local DP-SGD, reported by each


def check_pfedmoap(records: list[RoundRecord], final: RoundRecord) -> None:
    pool = PromptPool.from_json(final.strategy_state["prompt_pool"])
    assert sorted(pool.prompts) == sorted(final.metrics["clients"])
    assert all(prompt.shape == (N_CTX, WIDTH) for prompt in pool.prompts.values())
    for client in records[1].clients:  # round 2: the global prompt and one expert (the other client)
        assert client.bytes_down >= 2 * N_CTX * WIDTH * 2  # in fp16, the default task encoding


@pytest.mark.parametrize(
    ("method", "training", "own", "check"),
    [
        (
            "dpfpl",
            'dp = "sample"\n',
            "[dpfpl]\nrank = 2\n[dpfpl.server]\nglobal_noise_multiplier = 2.0\nglobal_clip = 0.5\n",
            check_dpfpl,
        ),
        ("pfedmoap", "", "[pfedmoap]\nexperts = 3\n", check_pfedmoap),
    ],
)
def test_two_client_processes_train_a_personalised_method_through_a_real_aggregator(
    method: str, training: str, own: str, check, tiny_bundle: Path, tmp_path: Path
) -> None:
    port = closed_port()
    config = write_config(
        tmp_path / "aggregator.toml", ROUNDS, {"port": port}, bundle=tiny_bundle, method=method
    )
    config.write_text(
        config.read_text() + f"\n[training]\nn_ctx = {N_CTX}\nbatch_size = 8\nlr = 0.01\n{training}\n{own}"
    )
    state = tmp_path / "state.sqlite"
    store = SQLiteStore(state)
    tokens = [store.issue_token(f"device {i}") for i in range(2)]
    store.close()
    server = AggregatorProcess(config)  # first: it and two clients importing torch at once on 2 cores is slow
    policy = () if "dp =" in training else ("--allow-no-dp",)  # pFedMoAP runs without DP here
    run_clients_to_the_end(start_clients(port, tiny_bundle, tokens, tmp_path, *policy), server, rounds=2)

    store = SQLiteStore(state, read_only=True)
    records, final = store.rounds(), store.latest_round()
    assert [r.round_id for r in records] == [1, 2] and all(len(r.clients) == 2 for r in records)
    assert {name: t.shape for name, t in final.tensors.items()} == {"ctx": (N_CTX, WIDTH)}
    for record in records:  # each upload is one fp16 prompt: no gating network, no local prompt
        assert all(c.bytes_up <= N_CTX * WIDTH * 2 + 64 for c in record.clients)
    for i in range(2):  # the personal parts live on the devices
        assert len(list((tmp_path / f"client{i}" / METHOD_STATE_DIR).glob(f"{method}-*.tensors"))) == 1
    check(records, final)
