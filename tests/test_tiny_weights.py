"""The committed tiny CLIP: its file matches the recorded provenance, loads strictly into the
fedprompt-tiny config, and is trained (zero-shot far above chance on clean test images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edge_client.bundle import sha256_file
from edge_client.datasets import fashion_mnist_dir, load_fashion_mnist
from export.pretrain import TINY_MODEL, WEIGHTS_DIR, create_tiny_model, zero_shot_accuracy

WEIGHTS = WEIGHTS_DIR / f"{TINY_MODEL}.safetensors"
PROVENANCE = json.loads((WEIGHTS_DIR / f"{TINY_MODEL}.json").read_text())


def test_weights_file_matches_its_provenance_and_stays_small() -> None:
    assert sha256_file(WEIGHTS) == PROVENANCE["sha256"]
    assert WEIGHTS.stat().st_size == PROVENANCE["bytes"] <= 8 * 2**20
    assert PROVENANCE["data"]["split"] == "train"
    assert PROVENANCE["settings"]["train_images"] < 60_000  # the rest is left for the clients


def test_weights_load_strictly_into_the_config() -> None:
    model = create_tiny_model()
    tensors = load_file(str(WEIGHTS))
    assert all(t.dtype == torch.float16 for t in tensors.values())
    model.load_state_dict({name: t.float() for name, t in tensors.items()}, strict=True)


@pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST data absent (install Debian's dataset-fashion-mnist)",
)
def test_weights_are_trained_zero_shot_far_above_chance() -> None:
    model = create_tiny_model()
    model.load_state_dict({name: t.float() for name, t in load_file(str(WEIGHTS)).items()})
    test = load_fashion_mnist("test").subset(np.arange(1000))
    assert zero_shot_accuracy(model, test) > 0.7
