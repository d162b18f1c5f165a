"""Opening a bundle on the device: hashes checked, sessions and tower usable, clear errors."""

from __future__ import annotations

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


def test_provider_choice() -> None:
    assert choose_providers()[-1] == CPU
    assert choose_providers(["cpu"]) == [CPU]
    with pytest.raises(ProviderError, match="not usable here"):
        choose_providers(["no-such-provider"])
