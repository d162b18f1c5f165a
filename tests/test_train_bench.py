"""`fedprompt bench train` on the tiny bundle: every variant computes the official loss and gradient
(the speed figures themselves are for the command's output, not for a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edge_client.train_bench import VARIANTS, bench_train, class_names
from fedprompt.cli import main


def test_bench_reports_every_variant_with_matching_loss_and_gradient(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    options = {"--classes": 7, "--batch-size": 4, "--steps": 1, "--n-ctx": 4, "--threads": 1, "--json": out}
    args = [str(tiny_bundle), *(str(part) for item in options.items() for part in item)]
    result = CliRunner().invoke(bench_train, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [row["variant"] for row in report["rows"]] == [v.name for v in VARIANTS]
    assert report["max_rel_error"] < 1e-4 and report["speedup"] > 0 and report["threads"] == 1
    full, *_, shared = report["rows"]
    assert full["prompt_length"] == 77 > shared["prompt_length"]
    assert "faster than the official pattern" in result.output
    fedmvp = report["fedmvp"]  # the tiny bundle takes visual prompts: FedMVP's row too
    assert len(fedmvp["rows"]) == 2 and fedmvp["max_rel_error"] < 1e-4 and fedmvp["sentences"] >= 7
    assert "FedMVP step is" in result.output


def test_bench_train_is_reachable_from_the_cli_and_bad_input_is_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    assert "shared prefix" in runner.invoke(main, ["bench", "train", "--help"]).output
    result = runner.invoke(main, ["bench", "train", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_class_names_are_distinct() -> None:
    assert len(set(class_names(300))) == 300
