"""`fedprompt export` and `fedprompt verify` through the real CLI on the tiny test config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from edge_client.bundle import Bundle, BundleError, sha256_file
from fedprompt.cli import main

TEST_CONFIG = Path(__file__).parents[1] / "export/model_configs/fedprompt-test.json"


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
    assert manifest["format_version"] == 2
    assert manifest["capabilities"] == ["text_prompts", "visual_prompts"]
    assert set(manifest["files"]) == {
        "image_encoder.onnx",
        "image_encoder.fp16.onnx",
        "image_encoder.int8.onnx",
        "image_encoder_prompted.onnx",
        "image_encoder_prompted.fp16.onnx",
        "text_encoder.onnx",
        "text_encoder.fp16.onnx",
        "text_tower.safetensors",
        "image_tower.safetensors",
        "bpe_simple_vocab_16e6.txt.gz",
    }
    assert manifest["parts"]["image_encoder_prompted"]["files"] == {
        "fp32": "image_encoder_prompted.onnx",
        "fp16": "image_encoder_prompted.fp16.onnx",
    }
    assert manifest["parity"]["cut_context"]["exact"]
    code, output = run_cli("verify", str(out))
    assert code == 0, output
    for row in (
        "files",
        "manifest",
        "opset",
        "tokenizer",
        "image fp32",
        "image fp16",
        "image int8",
        "text fp32",
        "text fp16",
        "text torch",
        "image torch",
        "image tokens",
        "empty prompts",
        "prompted fp32 P=0",
        "prompted fp32 P=4",
        "prompted fp16 P=0",
        "prompted fp16 P=4",
        "prompted = plain",
        "cut context",
        "recorded parity",
    ):
        assert any(line.startswith(row) and "ok" in line for line in output.splitlines()), row


def test_verify_fails_on_a_tampered_graph(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    with (copy / "image_encoder.onnx").open("ab") as handle:
        handle.write(b"\0")
    code, output = run_cli("verify", str(copy))
    assert code == 1
    assert "image_encoder.onnx does not match its sha256" in output


@pytest.mark.parametrize(
    ("tower", "tensor"), [("text_tower", "ln_final.bias"), ("image_tower", "class_embedding")]
)
def test_verify_fails_when_weights_do_not_match_the_model(
    tiny_bundle: Path, tmp_path: Path, tower: str, tensor: str
) -> None:
    """A consistent bundle (hashes updated) whose tower is not the model's is still caught."""
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    file = f"{tower}.safetensors"
    tensors = load_file(str(copy / file))
    tensors[tensor] = tensors[tensor] + 0.5
    save_file(tensors, str(copy / file))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][file]["sha256"] = sha256_file(copy / file)
    manifest["files"][file]["bytes"] = (copy / file).stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, output = run_cli("verify", str(copy))
    assert code == 1
    assert f"{tower.replace('_', ' ')} differs from {file}" in output


def _edited_copy(tiny_bundle: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the bundle with its manifest edited; every file still matches its sha256."""
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        for key in parents:
            manifest = manifest[key]
        manifest[leaf] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "reported"),
    [
        (_set("preprocess.mean", [0.5, 0.5, 0.5]), "preprocess.mean is [0.5, 0.5, 0.5] in the manifest"),
        (_set("logit_scale", 100.0), "logit_scale is 100.0 in the manifest"),
        (_set("preprocess.interpolation", "bilinear"), "preprocess.interpolation is 'bilinear'"),
        (_set("tokenizer.eot_token_id", 49406), "tokenizer.eot_token_id is 49406"),
        (_set("image_tokens", 49), "image_tokens is 49"),
        (_set("parts.image_tower.spec.heads", 4), "parts.image_tower.spec.heads is 4"),
        (_set("capabilities", ["text_prompts"]), "capabilities is ['text_prompts']"),
        (_set("text_tower.causal", False), "text_tower.causal is False"),
        (_set("opset", 18), "is opset 17, the manifest says 18"),
        (_set("cache_hint", 1), "a field verify does not know: cache_hint"),
    ],
)
def test_verify_fails_on_an_edited_manifest_field(
    tiny_bundle: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], reported: str
) -> None:
    copy = _edited_copy(tiny_bundle, tmp_path, edit)
    code, output = run_cli("verify", str(copy))
    assert code == 1, output
    assert reported in output
    assert output.splitlines()[-1].startswith("verify: FAILED")


def test_verify_fails_on_files_that_are_not_listed_or_not_a_part(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = _edited_copy(tiny_bundle, tmp_path, lambda m: m["parts"].pop("image_encoder_prompted"))
    (copy / "notes.txt").write_text("x")
    code, output = run_cli("verify", str(copy))
    assert code == 1
    assert "notes.txt is on disk but not listed" in output
    assert "image_encoder_prompted.onnx is listed but belongs to no part" in output
    assert "parts.image_encoder_prompted is missing" in output


def test_format_1_bundle_is_refused_with_the_re_export_command(tiny_bundle: Path, tmp_path: Path) -> None:
    def to_format_1(manifest: dict[str, Any]) -> None:
        for key in ("parts", "capabilities", "image_width", "image_tokens"):
            manifest.pop(key)
        manifest.update(format_version=1, precisions=["fp32", "fp16"])

    copy = _edited_copy(tiny_bundle, tmp_path, to_format_1)
    command = f"fedprompt export fedprompt-test --pretrained none --out {copy} --precision fp16"
    with pytest.raises(BundleError) as error:
        Bundle.open(copy)
    assert "format 1" in str(error.value) and str(error.value).endswith(command)
    code, output = run_cli("verify", str(copy))
    assert code == 1 and command in output


def test_a_model_without_a_vit_exports_without_visual_prompts(tmp_path: Path) -> None:
    config = json.loads(TEST_CONFIG.read_text())
    config["vision_cfg"] = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8}  # a small ModifiedResNet
    (tmp_path / "fedprompt-test-resnet.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "fedprompt-test-resnet.json")
    out = tmp_path / "resnet"
    code, output = run_cli("export", "fedprompt-test-resnet", "--pretrained", "none", "--out", str(out))
    assert code == 0, output
    bundle = Bundle.open(out)
    assert bundle.capabilities == ["text_prompts"]
    assert set(bundle.parts) == {"image_encoder", "text_encoder", "text_tower"}
    assert bundle.manifest["image_width"] is None and bundle.manifest["image_tokens"] is None
    message = (
        f"bundle {out} has no visual-prompt image tower: "
        "model fedprompt-test-resnet cannot take visual prompts"
    )
    for use in (bundle.image_tower, bundle.image_session_prompted, lambda: bundle.require("visual_prompts")):
        with pytest.raises(BundleError) as error:
            use()
        assert str(error.value) == message
    code, output = run_cli("verify", str(out))
    assert code == 0, output
    assert not any(line.startswith(("image torch", "prompted")) for line in output.splitlines())


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ({"attentional_pool": True}, "ViT image towers with attentional pooling are not supported"),
        (
            {"final_ln_after_pool": True},
            "with layer norm after pooling (final_ln_after_pool) are not supported",
        ),
        ({"pool_type": "avg"}, "with pooling 'avg' (only the class token) are not supported"),
        ({"no_ln_pre": True}, "no layer norm before the transformer (no_ln_pre) are not supported"),
        ({"qk_norm": True}, "image blocks of type CustomResidualAttentionBlock are not supported"),
    ],
)
def test_vit_variants_the_image_tower_does_not_implement_are_refused(
    tmp_path: Path, setting: dict[str, Any], refusal: str
) -> None:
    config = json.loads(TEST_CONFIG.read_text())
    config["vision_cfg"].update(setting)
    name = f"fedprompt-test-{next(iter(setting))}"
    (tmp_path / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    code, output = run_cli("export", name, "--pretrained", "none", "--out", str(tmp_path / "o"))
    assert code == 1
    assert refusal in output and "Traceback" not in output
    assert not (tmp_path / "o").exists()


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
    config = json.loads(TEST_CONFIG.read_text())
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
    manifest = Bundle.open(out).manifest
    assert manifest["capabilities"] == ["text_prompts", "visual_prompts"]
    assert (manifest["image_width"], manifest["image_tokens"]) == (768, 49)
    code, output = run_cli("verify", str(out))
    assert code == 0, output
    assert any(line.startswith("prompted fp32 P=4") and "ok" in line for line in output.splitlines())
