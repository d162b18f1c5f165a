"""`fedprompt demo --quick`: the real export, aggregator and client processes end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from edge_client.datasets import fashion_mnist_dir

FEDPROMPT = str(Path(sys.executable).with_name("fedprompt"))


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
    assert report["epsilon"] == pytest.approx(report["epsilon_opacus_rdp"], rel=1e-6)
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
