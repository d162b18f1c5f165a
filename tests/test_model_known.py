"""The run knows its model before round 1 (issue 10 point 1): the aggregator sizes the global
state from the method's spec and the bundle its config names, every task names the bundle's
digest, an update of other names or shapes (or an empty one) is refused whoever sends it first,
and a device with another bundle stops in one line before training."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from aggregator_process import FEDPROMPT, AggregatorProcess, RawClient, write_config
from colour_images import write_colour_folder

from aggregator.store import SQLiteStore
from edge_client.bundle import Bundle
from edge_client.local_privacy import ACCOUNTANT_FILE
from fedprompt.common.prompt_init import initial_context
from protos import fedprompt_pb2 as pb

ROUNDS = {
    "rounds": 1,
    "min_clients": 3,
    "min_fit": 3,
    "min_updates": 3,
    "round_timeout_s": 60.0,
    "poll_interval_s": 0.1,
    "heartbeat_interval_s": 0.5,
    "client_timeout_s": 10.0,
}
SHAPE = (16, 64)  # the default n_ctx and the fedprompt-test bundle's text width


def _start(tmp_path: Path, bundle: Path, clients: int = 3) -> tuple[AggregatorProcess, list[str]]:
    rounds = {**ROUNDS, "min_clients": clients, "min_fit": clients, "min_updates": clients}
    config = write_config(tmp_path / "aggregator.toml", rounds, {"update_encoding": "fp32"}, bundle=bundle)
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token(f"device {i}") for i in range(clients)]
    store.close()
    return AggregatorProcess(config), tokens


def _refused(push) -> str:
    with pytest.raises(grpc.RpcError) as error:
        push()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return error.value.details()


def test_a_hostile_first_upload_cannot_set_the_shapes_and_honest_clients_complete(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    server, tokens = _start(tmp_path, tiny_bundle)
    try:
        hostile, *honest = [RawClient(server.address, token) for token in tokens]
        header, tensors = hostile.wait_for_task()
        digest = hashlib.sha256((tiny_bundle / "manifest.json").read_bytes()).hexdigest()
        assert header.status == pb.TRAIN and header.bundle_digest == digest
        expected = initial_context(*SHAPE, 0.02, 0).astype(np.float16).astype(np.float32)  # fp16 tasks
        np.testing.assert_array_equal(tensors["ctx"], expected)  # before round 1
        good = tensors["ctx"] + 0.01
        assert "do not match this run's {'ctx': (16, 64)}" in _refused(
            lambda: hostile.push(1, {"ctx": np.zeros((1, 1), np.float32)}, 10)
        )
        _refused(lambda: hostile.push(1, {"ctx": good, "extra": np.zeros(10**6, np.float32)}, 10))
        assert "{} do not match" in _refused(lambda: hostile.push(1, {}, 10))
        sent = {}
        for index, client in enumerate(honest, 1):
            _, received = client.wait_for_task()
            sent[index] = received["ctx"] + 0.01 * index
            assert client.push(1, {"ctx": sent[index]}, 10).accepted
        assert hostile.push(1, {"ctx": good}, 10).accepted  # a well-formed update is still welcome
        server.wait_for_log(r"round 1/1 committed: 3 clients")
        assert server.terminate() == 0
    finally:
        server.kill()
    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    expected = (good + sent[1] + sent[2]) / 3
    np.testing.assert_allclose(store.global_tensors(1)["ctx"], expected, rtol=1e-6)
    assert store.run_info().bundle_digest == digest


def test_a_device_with_another_bundle_stops_in_one_line_before_training(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    other = tmp_path / "other-bundle"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest, indent=1))  # same model, other digest
    assert Bundle.open(other).digest != Bundle.open(tiny_bundle).digest
    server, (token,) = _start(tmp_path, tiny_bundle, clients=1)
    state = tmp_path / "device"
    data = write_colour_folder(tmp_path / "data", per_class=3)
    command = [FEDPROMPT, "client", "run", "--aggregator", server.address, "--bundle", str(other)]
    command += ["--data", str(data), "--state-dir", str(state), "--token", token]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    finally:
        server.kill()
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: this run uses bundle ") and "give the client the run's bundle" in last
    assert "training" not in result.stderr and not (state / ACCOUNTANT_FILE).exists()  # nothing paid
