"""`fedprompt export` and `fedprompt verify` through the real CLI on the tiny test config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edge_client.bundle import Bundle, sha256_file
from fedprompt.cli import main


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_export_all_precisions_then_verify(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    code, output = run_cli(
        "export",
        "fedprompt-test",
        "--pretrained",
        "none",
        "--out",
        str(out),
        "--precision",
        "fp16",
        "--precision",
        "int8",
    )
    assert code == 0, output
    manifest = Bundle.open(out).manifest
    assert manifest["precisions"] == ["fp32", "fp16", "int8"]
    assert set(manifest["files"]) == {
        "image_encoder.onnx",
        "image_encoder.fp16.onnx",
        "image_encoder.int8.onnx",
        "text_encoder.onnx",
        "text_encoder.fp16.onnx",
        "text_tower.safetensors",
    }
    assert manifest["parity"]["cut_context"]["exact"]
    code, output = run_cli("verify", str(out))
    assert code == 0, output
    for row in (
        "image fp32",
        "image fp16",
        "image int8",
        "text fp32",
        "text fp16",
        "text torch",
        "cut context",
    ):
        assert any(line.startswith(row) and "ok" in line for line in output.splitlines()), row


def test_verify_fails_on_a_tampered_graph(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    with (copy / "image_encoder.onnx").open("ab") as handle:
        handle.write(b"\0")
    code, output = run_cli("verify", str(copy))
    assert code == 1
    assert "image_encoder.onnx does not match its sha256" in output


def test_verify_fails_when_weights_do_not_match_the_model(tiny_bundle: Path, tmp_path: Path) -> None:
    """A consistent bundle (hashes updated) whose text tower is not the model's is still caught."""
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    tensors = load_file(str(copy / "text_tower.safetensors"))
    tensors["ln_final.bias"] = tensors["ln_final.bias"] + 0.5
    save_file(tensors, str(copy / "text_tower.safetensors"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["text_tower.safetensors"]["sha256"] = sha256_file(copy / "text_tower.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, output = run_cli("verify", str(copy))
    assert code == 1
    assert "text tower differs from text_tower.safetensors" in output


def test_offline_pretrained_tag_fails_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "fedprompt"),
            "export",
            "ViT-B-32",
            "--pretrained",
            "openai",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot download pretrained weights 'openai'" in lines[0] and "--pretrained /path/to" in lines[0]


def test_unknown_tag_model_and_bad_weights_path_are_one_line_errors(tmp_path: Path) -> None:
    code, output = run_cli(
        "export", "fedprompt-test", "--pretrained", "laion2b", "--out", str(tmp_path / "a")
    )
    assert code == 1 and "unknown pretrained tag 'laion2b'" in output
    code, output = run_cli("export", "no-such-model", "--pretrained", "none", "--out", str(tmp_path / "b"))
    assert code == 1 and "unknown model 'no-such-model'" in output
    code, output = run_cli(
        "export", "fedprompt-test", "--pretrained", "/no/such.safetensors", "--out", str(tmp_path)
    )
    assert code == 1 and "does not exist" in output


def test_unsupported_text_tower_is_named(tmp_path: Path) -> None:
    config = json.loads((Path(__file__).parents[1] / "export/model_configs/fedprompt-test.json").read_text())
    config["text_cfg"]["pool_type"] = "first"
    (tmp_path / "fedprompt-test-first-token.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fedprompt-test-first-token.json")
    code, output = run_cli(
        "export", "fedprompt-test-first-token", "--pretrained", "none", "--out", str(tmp_path / "o")
    )
    assert code == 1
    assert "text pooling 'first' is not supported" in output
    assert "Traceback" not in output


def test_export_refuses_to_overwrite_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    code, output = run_cli("export", "fedprompt-test", "--pretrained", "none", "--out", str(tmp_path))
    assert code == 1 and "not a bundle" in output
    assert (tmp_path / "notes.txt").exists()


@pytest.mark.slow
def test_vit_b_32_exports_and_verifies(tmp_path: Path) -> None:
    out = tmp_path / "vit-b-32"
    code, output = run_cli("export", "ViT-B-32", "--pretrained", "none", "--out", str(out))
    assert code == 0, output
    code, output = run_cli("verify", str(out))
    assert code == 0, output
