"""Shared fixtures. `tiny_bundle` exports the tiny `fedprompt-test` CLIP config once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_MODEL = "fedprompt-test"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a bundle of the tiny test model (random seeded weights, fp32 graphs only).
    Treat it as read-only: it is shared by every test of the session."""
    from export.exporter import export_bundle

    return export_bundle(TINY_MODEL, "none", tmp_path_factory.mktemp("bundles") / TINY_MODEL, progress=False)


@pytest.fixture(scope="session")
def caption_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the tiny test model with a small random-weight T5 decoder exported from a local
    folder (the captioning capability). Read-only, shared by the session."""
    from export.exporter import export_bundle
    from tests.random_t5 import save_random_t5

    root = tmp_path_factory.mktemp("caption")
    folder = save_random_t5(root / "t5")
    return export_bundle(TINY_MODEL, "none", root / "bundle", progress=False, decoder=str(folder))
