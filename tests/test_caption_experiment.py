"""The captioning comparison on a tiny split, every trained row through AFSPL's two halves and the
daemon's round coordinator in one process: every method scored with BLEU-4 and CIDEr-D (greedy
and beam), top-K uploads are smaller than full ones, and only the DP rows report an epsilon, the
devices' accountant's for that many rounds of the client-level mechanism."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_client.bundle import Bundle
from edge_client.datasets import fashion_mnist_dir
from fedprompt.common.privacy import PrivacyAccountant, client_level_accounting
from fedprompt.harness.caption_experiment import (
    METHODS,
    CaptionRun,
    CaptionSplit,
    markdown_table,
    run_experiment,
)


@pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST data absent"
)
def test_every_method_runs_and_reports_bytes_and_epsilon(caption_bundle: Path) -> None:
    run = CaptionRun(rounds=2, tokens=10, max_tokens=5, beams=2, batch_size=8, local_epochs=1)
    result = run_experiment(
        Bundle.open(caption_bundle), CaptionSplit(clients=2, train_scenes=8, eval_scenes=3), run
    )
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == [m.name for m in METHODS]
    for row in rows.values():
        assert {"bleu4_greedy", "cider_d_greedy", "bleu4_beam", "cider_d_beam"} <= set(row)
    assert rows["frozen captioner, no prompt"]["bytes_up_per_client_round"] == 0
    full, top = rows["FedAvg, full upload"], rows["AFSPL (fusion + top-K)"]
    assert top["bytes_up_per_client_round"] < 0.5 * full["bytes_up_per_client_round"]  # 3 of 10 rows
    accountant = PrivacyAccountant()
    accountant.step(**client_level_accounting(run.noise_multiplier))
    accountant.step(**client_level_accounting(run.noise_multiplier))
    for name, row in rows.items():
        if name.endswith("+ DP"):
            assert row["epsilon"] == pytest.approx(accountant.epsilon(run.delta))
        else:
            assert row["epsilon"] is None
    assert markdown_table(result).count("\n") == len(METHODS) + 1
