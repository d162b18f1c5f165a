"""`fedprompt bench BUNDLE` runs end to end and reports every engine it measured."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from fedprompt.cli import main


def test_bench_prints_and_writes_torch_and_onnxruntime_rows(tiny_bundle: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(tiny_bundle),
            "--batch-sizes",
            "1,2",
            "--providers",
            "cpu",
            "--classes",
            "5",
            "--json",
            str(report_path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    engines = {(row["engine"], row["batch"]) for row in report["image"]}
    assert engines == {("torch eager", 1), ("torch eager", 2), ("onnxruntime", 1), ("onnxruntime", 2)}
    assert all(row["p95_ms"] >= row["p50_ms"] > 0 for row in report["image"])
    text = report["text"]
    assert text["classes"] == 5 and text["cut"]["length"] < text["full"]["length"] == 77
    assert report["machine"]["cores"] >= 1 and "CPUExecutionProvider" in report["machine"]["usable_providers"]
    assert "cut is" in result.output and "onnxruntime" in result.output


def test_bench_rejects_an_unusable_provider(tiny_bundle: Path) -> None:
    result = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--providers", "warp-drive"])
    assert result.exit_code == 1
    assert "not usable here" in result.output
