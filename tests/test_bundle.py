"""Opening a bundle on the device: hashes checked, sessions and tower usable, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_client.bundle import Bundle, BundleError, BundleIntegrityError
from edge_client.providers import CPU, ProviderError, choose_providers


def test_open_gives_sessions_tower_and_settings(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    size = bundle.manifest["image_size"]
    session = bundle.image_session()
    features = session.run(None, {"images": np.zeros((3, 3, *size), np.float32)})[0]
    assert features.shape == (3, bundle.embed_dim)
    assert bundle.text_tower().embed_dim == bundle.embed_dim
    assert bundle.tokenizer()(["a cat"]).shape == (1, bundle.context_length)
    assert set(bundle.preprocess) >= {"mean", "std", "resize", "crop", "interpolation"}
    assert len(bundle.digest) == 64
    assert bundle.capabilities == ["text_prompts", "visual_prompts"]
    tower = bundle.image_tower()
    assert (tower.spec.width, tower.spec.tokens) == (
        bundle.manifest["image_width"],
        bundle.manifest["image_tokens"],
    )
    prompted = bundle.image_session_prompted(providers=["cpu"])
    feeds = {
        "images": np.zeros((2, 3, *size), np.float32),
        "prompt_tokens": np.zeros((2, 3, tower.spec.width), np.float32),
    }
    features, tokens = prompted.run(None, feeds)
    assert features.shape == (2, bundle.embed_dim) and tokens.shape == (
        2,
        tower.spec.tokens,
        tower.spec.width,
    )


def test_tampered_file_is_refused_with_a_clear_message(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    with (copy / "text_tower.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleIntegrityError, match=r"text_tower\.safetensors does not match its sha256"):
        Bundle.open(copy)


def test_missing_bundle_and_precision_are_clear_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        Bundle.open(tmp_path)
    with pytest.raises(BundleError, match="no fp16 image encoder"):
        Bundle.open(tiny_bundle).image_session("fp16")
    with pytest.raises(BundleError, match="no fp16 image prompted encoder"):
        Bundle.open(tiny_bundle).image_session_prompted("fp16")
    with pytest.raises(BundleError, match="unknown bundle capability 'segmentation'"):
        Bundle.open(tiny_bundle).require("segmentation")


def test_a_manifest_without_format_2_fields_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["parts"]["text_tower"], manifest["logit_scale"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest.json lacks logit_scale, parts.text_tower$"):
        Bundle.open(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 3}))
    with pytest.raises(BundleError, match="format version 3 is not supported"):
        Bundle.open(copy)


def test_provider_choice() -> None:
    assert choose_providers()[-1] == CPU
    assert choose_providers(["cpu"]) == [CPU]
    with pytest.raises(ProviderError, match="not usable here"):
        choose_providers(["no-such-provider"])


def test_every_file_a_part_uses_must_be_hashed_and_plainly_named(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_bundle, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["parts"]["image_tower"]["file"] = "elsewhere.safetensors"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"elsewhere\.safetensors is used but not listed"):
        Bundle.open(copy)
    manifest["parts"]["image_tower"]["file"] = "../image_tower.safetensors"
    manifest["files"]["../image_tower.safetensors"] = manifest["files"].pop("image_tower.safetensors")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="is not a plain file name"):
        Bundle.open(copy)
