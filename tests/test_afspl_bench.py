"""`fedprompt bench train` on a captioning bundle adds AFSPL's row: cached image features against
re-encoding every image every step, same loss and gradient."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edge_client.train_bench import bench_train


def test_bench_train_has_an_afspl_row_with_matching_loss_and_gradient(
    caption_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    args = [
        str(caption_bundle),
        "--classes",
        "3",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--n-ctx",
        "2",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(bench_train, args)
    assert result.exit_code == 0, result.output
    afspl = json.loads(out.read_text())["afspl"]
    assert [r["variant"].split(":")[0] for r in afspl["rows"]] == ["re-encode", "fedprompt AFSPL"]
    assert afspl["max_rel_error"] < 1e-4 and afspl["rows"][0]["loss_rel_error"] == 0.0
    assert "AFSPL step is" in result.output
