"""Writes `schema1-promptfl.sqlite` + `schema1-promptfl.json`: an aggregator state file of store
schema 1 (fedprompt before method specs; commit 0922029), for `tests/test_store_migration.py`.

It must run with THAT commit's code (the current store writes schema 2):

    git archive 0922029 | tar -x -C /tmp/old && cd /tmp/old && python tests/data/make_schema1_state.py OUT_DIR

A PromptFL run (n_ctx 4, lr 0.01, text width 64 as the `fedprompt-test` bundle) with round 1
committed (two clients) and round 2 open with one accepted update; the JSON keeps the two
enrolment tokens so that the test can enrol the same clients again.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from aggregator.config import AggregatorConfig, RoundConfig
from aggregator.rounds import RoundCoordinator
from aggregator.store import SQLiteStore
from fedprompt.common.codec import encode_tensor_set
from fedprompt.common.settings import TrainingSettings

WIDTH = 64


def wait_for(condition, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the old coordinator did not get there")
        time.sleep(0.01)


def main(out: Path) -> None:
    state = out / "schema1-promptfl.sqlite"
    state.unlink(missing_ok=True)
    config = AggregatorConfig(
        rounds=RoundConfig(rounds=3, min_clients=2, min_fit=2, min_updates=2, round_timeout_s=3600),
        training=TrainingSettings(n_ctx=4, lr=0.01),
    ).check()
    store = SQLiteStore(state)
    coordinator = RoundCoordinator(store, config)
    tokens = [store.issue_token(f"client {i}") for i in range(2)]
    clients = [coordinator.enroll(token, f"client {i}")[0] for i, token in enumerate(tokens)]
    driver = threading.Thread(target=coordinator.run, daemon=True)
    driver.start()
    rng = np.random.default_rng(0)

    def upload(client: str, round_id: int) -> None:
        wait_for(lambda: coordinator.next_task(client).status == "train")
        ctx = rng.standard_normal((4, WIDTH)).astype(np.float32) * 0.02
        payload = encode_tensor_set({"ctx": ctx}, "fp16")
        coordinator.submit(client, coordinator.run_id, round_id, 10, {"accuracy": 0.5}, {}, payload)

    for client in clients:
        upload(client, 1)
    wait_for(lambda: coordinator.committed == 1)
    upload(clients[0], 2)
    coordinator.stop()
    driver.join()
    store.close()
    meta = {"run_id": coordinator.run_id, "tokens": tokens, "clients": clients, "text_width": WIDTH}
    (out / "schema1-promptfl.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
