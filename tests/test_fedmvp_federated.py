"""FedMVP through the real aggregator daemon and real client processes on the tiny bundle (the
devices' attribute file, client-level DP on the whole upload, low-rank uploads on the int8 wire,
then `fedprompt predict` on a device), and its server half: robust rules see decoded updates,
the secure sum gives the mean delta, and compressed uploads cannot be summed securely."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from aggregator_process import FEDPROMPT, AggregatorProcess, write_config
from aggregator_process import free_port as closed_port
from test_federated import run_clients_to_the_end, start_clients

from aggregator.config import ConfigError, load_config
from aggregator.store import SQLiteStore
from aggregator.strategies.base import ClientUpdate
from aggregator.strategies.combine import UpdateCombiner
from aggregator.strategies.registry import SERVER_STRATEGIES
from edge_client.device_run import load_device_run
from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.codec import encode_tensor_set
from fedprompt.common.compact_update import compress
from fedprompt.common.methods import METHOD_SPECS, RunSettings
from fedprompt.common.secure_round import WeightedSum

FORMER = 'former_heads = 4\nff_mult = 2\ncompression = "lowrank"\ncompression_rank = 2\n'


def test_two_client_processes_train_fedmvp_through_a_real_aggregator(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    port = closed_port()
    rounds = {
        "rounds": 2,
        "min_clients": 2,
        "min_fit": 2,
        "min_updates": 2,
        "round_timeout_s": 200.0,
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": 1.0,
        "client_timeout_s": 60.0,
    }
    config = write_config(
        tmp_path / "aggregator.toml",
        rounds,
        {"port": port, "update_encoding": "int8"},
        bundle=tiny_bundle,
        method="fedmvp",
    )
    config.write_text(
        config.read_text()
        + '\n[training]\nbatch_size = 8\nlr = 0.002\noptimizer = "adam"\n'
        + 'dp = "client"\nclip = 1.0\nnoise_multiplier = 1.0\n'
        + "\n[fedmvp]\n"
        + FORMER
    )
    attributes = tmp_path / "attributes.json"
    phrases = {
        "stripes": ["parallel bands"],
        "checks": ["a grid of squares", "corners"],
        "disc": ["a round shape"],
    }
    attributes.write_text(json.dumps(phrases))
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token(f"device {i}") for i in range(2)]
    store.close()
    clients = start_clients(port, tiny_bundle, tokens, tmp_path, "--attributes", str(attributes))
    time.sleep(1.0)
    run_clients_to_the_end(clients, AggregatorProcess(config), rounds=2)

    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    records = store.rounds()
    assert [r.round_id for r in records] == [1, 2] and all(len(r.clients) == 2 for r in records)
    first, second = store.global_tensors(1), store.global_tensors(2)
    settings = RunSettings.from_sections("fedmvp", client={"former_heads": 4, "ff_mult": 2})
    start = METHOD_SPECS["fedmvp"].initial_state(settings.task, BundleDims.read(tiny_bundle))
    assert {n: t.shape for n, t in first.items()} == {n: t.shape for n, t in start.items()}
    assert not np.allclose(first["ff_in_weight"], start["ff_in_weight"])
    assert not np.allclose(first["ff_in_weight"], second["ff_in_weight"])
    full_fp16 = len(encode_tensor_set(start, "fp16"))
    for record in records:
        assert record.metrics["epsilon_max"] > 0
        assert record.metrics["bytes_up_per_client"] * 4 <= full_fp16  # low rank on int8
    kept = load_device_run(tmp_path / "client0")
    assert (kept.method, kept.round_id) == ("fedmvp", 2)
    assert (tmp_path / "client0" / "attributes.json").exists()
    predicted = tmp_path / "predict.json"
    subprocess.run(
        [FEDPROMPT, "predict", "--bundle", str(tiny_bundle), "--state-dir", str(tmp_path / "client0"),
         "--data", str(tmp_path / "d0"), "--json", str(predicted)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads(predicted.read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and len(report["predictions"]) == 18


def _strategy(rule: str = "mean", compression: str = "lowrank"):
    settings = RunSettings.from_sections("fedmvp", client={"compression": compression, "compression_rank": 2})
    return SERVER_STRATEGIES["fedmvp"](settings, UpdateCombiner(rule=rule))


def test_server_decodes_each_upload_before_the_robust_rule() -> None:
    rng = np.random.default_rng(0)
    state = {"w": np.zeros((6, 5), np.float32), "b": np.zeros(3, np.float32)}
    deltas = [
        {"w": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(3)} for _ in range(3)
    ]
    uploads = [compress(d, 2, {}, rng)[0] for d in deltas]
    updates = [ClientUpdate(f"c{i}", u, 10) for i, u in enumerate(uploads)]
    dense = [u["w.p"] @ u["w.q"].T for u in uploads]
    new, _ = _strategy("median").aggregate(state, updates)
    np.testing.assert_allclose(new["w"], np.median(np.stack(dense), axis=0), atol=1e-5)
    np.testing.assert_allclose(new["b"], np.median(np.stack([d["b"] for d in deltas]), axis=0), atol=1e-6)


def test_secure_sum_is_the_mean_delta_and_compressed_uploads_are_refused(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    state = {"w": np.ones((2, 2), np.float32)}
    total = WeightedSum({"w": np.full((2, 2), 6.0)}, weight=3.0, count=3)
    new, _ = _strategy(compression="none").aggregate_sum(state, total)
    np.testing.assert_allclose(new["w"], 3.0)
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f'[server]\nstate = "s.sqlite"\n[method]\nname = "fedmvp"\nbundle = "{tiny_bundle}"\n'
        "[rounds]\nmin_clients = 4\nmin_fit = 4\nmin_updates = 4\n"
        f"[secure_aggregation]\nenabled = true\n[fedmvp]\n{FORMER}"
    )
    with pytest.raises(
        ConfigError, match=r'cannot run with \[secure_aggregation\] enabled: .*compression = "none"'
    ):
        load_config(config)
    config.write_text(config.read_text().replace('"lowrank"', '"none"'))
    assert load_config(config).method.name == "fedmvp"
