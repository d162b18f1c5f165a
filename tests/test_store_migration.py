"""A pre-upgrade aggregator state file resumes: `tests/data/schema1-promptfl.sqlite` was written by
the store of schema 1 (before method specs; `tests/data/make_schema1_state.py`, run on commit
0922029): a PromptFL run with round 1 committed and round 2 open with one accepted update. The
current store migrates it forward on open and the run goes on with the same clients."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import load_config
from aggregator.rounds import RoundCoordinator
from aggregator.store import SCHEMA_VERSION, SQLiteStore, StoreError
from fedprompt.common.codec import encode_tensor_set

DATA = Path(__file__).parent / "data"
CONFIG = """
[rounds]
rounds = 3
min_clients = 2
min_fit = 2
min_updates = 2
round_timeout_s = 3600.0
[method]
name = "promptfl"
bundle = "{bundle}"
[training]
n_ctx = 4
lr = {lr}
accountant = "rdp"  # the run's (the default then); the default is "prv" now
"""


def _config(tmp_path: Path, bundle: Path, lr: float = 0.01) -> Path:
    path = tmp_path / f"aggregator-{lr}.toml"
    path.write_text(CONFIG.format(bundle=bundle, lr=lr))
    return path


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "the coordinator did not get there"
        time.sleep(0.01)


def test_a_schema_1_state_file_migrates_forward_and_its_run_resumes(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    meta = json.loads((DATA / "schema1-promptfl.json").read_text())
    state = tmp_path / "state.sqlite"
    shutil.copy(DATA / "schema1-promptfl.sqlite", state)
    old = SQLiteStore(state, read_only=True)  # readable as it is
    assert old.schema == 1 and old.run_info().run_id == meta["run_id"] and old.run_info().bundle_digest == ""
    round_1 = old.global_tensors(1)["ctx"]
    old.close()

    with pytest.raises(StoreError, match=r"other settings \(core.lr: 0.01 stored, 0.02 given\)"):  # migrated
        RoundCoordinator(SQLiteStore(state), load_config(_config(tmp_path, tiny_bundle, lr=0.02)))
    store = SQLiteStore(state)
    assert store.schema == SCHEMA_VERSION
    assert sqlite3.connect(state).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    coordinator = RoundCoordinator(store, load_config(_config(tmp_path, tiny_bundle)))
    assert coordinator.run_id == meta["run_id"] and coordinator.committed == 1
    assert store.run_info().bundle_digest == coordinator.bundle_digest  # adopted at resume
    clients = [coordinator.enroll(token, f"client {i}")[0] for i, token in enumerate(meta["tokens"])]
    assert clients == meta["clients"]  # the same tokens enrol the same clients
    driver = threading.Thread(target=coordinator.run, daemon=True)
    driver.start()
    try:
        assert coordinator.next_task(clients[0]).status == "wait"  # its round-2 update was kept
        sent = {}
        for round_id, senders in ((2, clients[1:]), (3, clients)):
            for client in senders:
                _wait_for(lambda c=client: coordinator.next_task(c).status == "train")
                sent[client] = np.full((4, meta["text_width"]), 0.01 * round_id, np.float32)
                payload = encode_tensor_set({"ctx": sent[client]}, "fp16")
                coordinator.submit(client, coordinator.run_id, round_id, 10, {"accuracy": 0.5}, {}, payload)
            _wait_for(lambda r=round_id: coordinator.committed == r)
    finally:
        coordinator.stop()
        driver.join(10)
    np.testing.assert_array_equal(store.global_tensors(1)["ctx"], round_1)  # history untouched
    assert [r.round_id for r in store.rounds()] == [1, 2, 3]
    assert sorted(store.rounds()[1].metrics["clients"]) == sorted(clients)  # the kept update counted
    np.testing.assert_allclose(store.global_tensors(3)["ctx"], 0.03, rtol=1e-3)
    store.close()
