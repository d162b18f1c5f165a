"""`fedprompt export --decoder` and `fedprompt verify` of the captioning part: a random T5 from a local
folder exports, verifies (ONNX decoder vs transformers' T5 in torch: logits, greedy and beam
generations) and fails when its tensors are changed; a hub tag fails in one line offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edge_client.bundle import Bundle, BundleError, sha256_file
from fedprompt.cli import main


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_a_local_t5_folder_exports_and_verifies(caption_bundle: Path) -> None:
    bundle = Bundle.open(caption_bundle)
    assert "captioning" in bundle.capabilities
    assert bundle.parts["decoder"]["source"]["kind"] == "path"
    assert bundle.parts["caption_projection"]["init"] == "random"
    code, output = run_cli("verify", str(caption_bundle))
    assert code == 0, output
    for line in ("caption enc P=0", "caption enc P=4", "decoder logits", "decoder tokenizer"):
        assert any(row.startswith(line) and "ok" in row for row in output.splitlines()), (line, output)
    assert "4 captions, onnxruntime vs torch: identical  ok" in output
    assert "torch steps vs transformers' generate: identical  ok" in output
    assert "3 beams, onnxruntime vs torch: identical  ok" in output
    assert "verify: all checks passed" in output.splitlines(), output


def test_verify_fails_when_the_decoder_tensors_differ_from_the_source(
    caption_bundle: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(caption_bundle, tmp_path / "copy")
    tensors = load_file(str(copy / "decoder.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(copy / "decoder.safetensors"))
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["files"]["decoder.safetensors"]
    entry.update(
        sha256=sha256_file(copy / "decoder.safetensors"), bytes=(copy / "decoder.safetensors").stat().st_size
    )
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, output = run_cli("verify", str(copy))
    assert code == 1 and "the rebuilt decoder differs from decoder.safetensors" in output


def test_a_bundle_without_a_decoder_says_so_in_one_line(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    assert "captioning" not in bundle.capabilities
    with pytest.raises(
        BundleError, match="has no caption decoder: model fedprompt-test cannot write captions"
    ):
        bundle.caption_stepper()


def test_offline_hub_decoder_fails_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from fedprompt.cli import main; main()",
            "export",
            "fedprompt-test",
            "--pretrained",
            "none",
            "--decoder",
            "google/flan-t5-small",
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
    assert "cannot download decoder 'google/flan-t5-small'" in lines[0] and "--decoder /path/to/" in lines[0]
    assert not (tmp_path / "x").exists()


def test_a_model_without_patch_tokens_refuses_a_decoder(tmp_path: Path) -> None:
    code, output = run_cli(
        "export",
        "RN50",
        "--pretrained",
        "none",
        "--decoder",
        "google/flan-t5-small",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 1 and "--decoder needs a ViT image tower" in output
