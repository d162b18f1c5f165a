"""Base-to-new and unseen-domain evaluation of the harness: accuracy among a subset of classes,
clients trained on base classes only, and the served classifiers scored on new classes and on a
domain no client trained in, end to end through `fedprompt experiment` on the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edge_client.datasets import fashion_mnist_dir
from fedprompt.cli import main
from fedprompt.harness.generalisation import among, harmonic


def test_accuracy_among_a_subset_of_classes() -> None:
    logits = torch.tensor(
        [[9.0, 1.0, 2.0, 0.0], [9.0, 0.0, 1.0, 2.0], [0.0, 5.0, 1.0, 0.0], [0.0, 0.0, 1.0, 3.0]]
    )
    labels = torch.tensor([2, 3, 1, 2])
    assert among(logits, labels, [2, 3]) == pytest.approx(2 / 3)  # class 0's large logits do not count
    assert among(logits, labels, [0, 1]) == 1.0  # only the image of class 1 is scored
    assert among(logits, labels, range(4)) == 0.25
    assert harmonic(0.8, 0.4) == pytest.approx(2 * 0.32 / 1.2) and harmonic(0.0, 0.0) == 0.0


CONFIG = """
name = "b2n"
seeds = [0]
[bundle]
path = "BUNDLE"
[split]
num_clients = 2
alpha = 1.0
shifts = ["clean", "tint-orange"]
max_train_per_client = 24
eval_per_class = 2
base_classes = 5
unseen_shift = "tint-blue"
[rounds]
rounds = 1
[training]
n_ctx = 4
lr = 0.01
batch_size = 16
[[methods]]
method = "zero-shot"
[[methods]]
label = "PromptFL"
method = "promptfl"
METHODS
"""


@pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST data absent"
)
def test_experiment_reports_base_new_and_unseen_domain(tiny_bundle: Path, tmp_path: Path) -> None:
    config = tmp_path / "b2n.toml"
    config.write_text(CONFIG.replace("BUNDLE", str(tiny_bundle)).replace("METHODS", EXTRA_METHODS))
    args = [
        "experiment",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "out"),
        "--markdown",
        str(tmp_path / "t.md"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "t.md").read_text()
    assert "| method | base | new | H (base, new) | unseen domain |" in summary
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())["rows"]
    finals = {
        r["method"]: r
        for r in rows
        if r["round"] == max(x["round"] for x in rows if x["method"] == r["method"])
    }
    assert set(finals) == {"zero-shot", "PromptFL", *EXTRA_LABELS}
    for row in finals.values():
        scores = [row[name] for name in ("served_base", "served_new", "served_hm", "served_unseen")]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert row["served_hm"] == pytest.approx(harmonic(row["served_base"], row["served_new"]), abs=1e-9)
    split = json.loads((tmp_path / "out" / "metrics.json").read_text())["splits"]["0"]["clients"]
    assert all(sum(c["train_class_counts"][5:]) == 0 and sum(c["train_class_counts"]) > 0 for c in split)


EXTRA_METHODS = ""
EXTRA_LABELS: tuple[str, ...] = ()
