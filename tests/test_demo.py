"""`fedprompt demo --quick`: the real export, aggregator and client processes end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from independent_accounting import assert_tight

from edge_client.datasets import fashion_mnist_dir
from fedprompt.harness.demo import FULL
from fedprompt.harness.experiment_config import load_experiment_config

FEDPROMPT = str(Path(sys.executable).with_name("fedprompt"))
EXPERIMENTS = Path(__file__).parents[1] / "fedprompt/harness/experiments"


@pytest.mark.slow
@pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST data absent (install Debian's dataset-fashion-mnist)",
)
def test_quick_demo_writes_a_sane_report(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    result = subprocess.run(
        [FEDPROMPT, "demo", "--quick", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("zero_shot_accuracy", "local_only_accuracy", "final_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    assert report["rounds"] == 2 == len(report["per_round"])
    assert math.isfinite(report["epsilon"]) and report["epsilon"] > 0
    training = report["settings"]["training"]
    history = [(training["noise_multiplier"] / 2, 1.0, report["rounds"])]  # replace-one: sigma / 2
    assert_tight(report["epsilon"], history, report["delta"])
    assert report["epsilon"] < report["epsilon_rdp"] and report["accountant"] == "prv"
    assert "replace-one adjacency" in result.stdout and "opacus PRV" in result.stdout
    assert 0 < report["delta"] < 1
    assert 0 < report["bytes_up_per_client_round"] <= 16 * 1024
    assert all(len(r["clients"]) == 4 for r in report["per_round"])
    domains = {c["domain"] for c in report["per_client"]}
    assert len(domains) == 4  # every client in its own image domain
    held = [[k for k, n in enumerate(c["train_label_counts"]) if n] for c in report["per_client"]]
    assert all(len(classes) == 1 for classes in held)  # one class per client
    assert len({classes[0] for classes in held}) == 4  # and a different one each
    assert "held-out acc" in result.stdout and "local-only" in result.stdout
    assert (tmp_path / "work" / "logs" / "aggregator.log").is_file()

    # on a device after the demo: its served model classifies its held-out folder as the demo said
    work, predicted = tmp_path / "work", tmp_path / "predict.json"
    device = work / "clients" / "client-0"
    done = subprocess.run(
        [FEDPROMPT, "predict", "--bundle", str(work / "bundle"), "--state-dir", str(device),
         "--data", str(work / "data" / "client_0" / "eval"), "--json", str(predicted)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(predicted.read_text())["accuracy"] == pytest.approx(
        report["per_client"][0]["federated"],
        abs=1e-6,  # the demo's mean is float32
    )


@pytest.mark.parametrize(
    ("name", "split"),
    [
        ("demo-one-class", FULL.split),
        ("demo-dirichlet", replace(FULL.split, scheme="dirichlet", alpha=0.1, classes_per_client=2)),
    ],
)
def test_demo_experiment_configs_repeat_the_demo_setting(name: str, split: object) -> None:
    """The configs that measure the demo's margin over seeds must not drift from `FULL`."""
    config = load_experiment_config(EXPERIMENTS / f"{name}.toml")
    assert config.split.settings(FULL.split.seed) == split
    assert config.rounds.rounds == FULL.rounds
    assert config.entry("PromptFL + client DP").settings.core == FULL.training
    no_dp = config.entry("PromptFL").settings.core  # the same training, DP off (its clip/noise unused)
    training = FULL.training
    assert replace(no_dp, clip=training.clip, noise_multiplier=training.noise_multiplier) == replace(
        training, dp="none"
    )
