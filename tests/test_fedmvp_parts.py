"""FedMVP's attribute sentences (a device's file, the shipped file for its classes, or class names
with one warning) and its compact uploads (low-rank factors with error feedback: exact on
low-rank updates, nothing lost over rounds, at most a tenth of the fp16 PromptFormer on the wire)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edge_client.attributes import AttributeFileError, device_sentences, install, sentence
from edge_client.datasets import FASHION_MNIST_CLASSES
from fedprompt.common.codec import decode_tensor_set, encode_tensor_set
from fedprompt.common.compact_update import compress, decompress, upload_shapes
from fedprompt.common.promptformer import PromptFormerShape, initial_promptformer


def test_sentences_are_worded_as_the_official_code() -> None:
    assert sentence("coat", "a collar") == "a photo of a coat, which is a collar."
    assert sentence("bag", "has handles") == "a photo of a bag, which has handles."
    assert sentence("bag", "handles") == "a photo of a bag, which has handles."
    assert sentence("boot", "often laced") == "a photo of a boot, which often laced."


def test_shipped_file_serves_the_built_in_classes(tmp_path: Path) -> None:
    found = device_sentences(tmp_path, FASHION_MNIST_CLASSES)
    assert found.source == "fashion-mnist.json"
    assert set(found.classes) == set(range(10)) and len(found.texts) >= 30
    assert found.texts[0].startswith("a photo of a t-shirt, which has")


def test_device_file_is_checked_and_kept(tmp_path: Path) -> None:
    classes = ("cat", "dog")
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"cat": ["whiskers"], "mouse": ["a tail"]}))
    with pytest.raises(AttributeFileError, match="missing \\['dog'\\], unknown \\['mouse'\\]"):
        install(given, tmp_path / "state", classes)
    given.write_text(json.dumps({"cat": ["whiskers", "pointed ears"], "dog": ["a wet nose"]}))
    install(given, tmp_path / "state", classes)
    given.unlink()  # the device's copy is what later rounds and predict read
    found = device_sentences(tmp_path / "state", classes)
    assert found.classes == (0, 0, 1) and found.texts[2] == "a photo of a dog, which is a wet nose."


def test_without_attributes_class_names_and_one_warning(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        found = device_sentences(tmp_path, ("cat", "dog"))
    assert found.texts == ("a photo of a cat.", "a photo of a dog.") and found.source == "class names"
    assert len([r for r in caplog.records if "no attribute file" in r.message]) == 1


SHAPE = PromptFormerShape(text_dim=64, width=128)  # the tiny CLIP's widths


def test_lowrank_is_exact_on_low_rank_updates() -> None:
    rng = np.random.default_rng(0)
    update = {
        "w": (rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))).astype(np.float32),
        "b": np.ones(5),
    }
    upload, memory = compress(update, 4, {}, rng)
    assert {name: t.shape for name, t in upload.items()} == upload_shapes(
        {"w": (40, 30), "b": (5,)}, "lowrank", 4
    )
    dense = decompress(upload, {"w": (40, 30), "b": (5,)})
    np.testing.assert_allclose(dense["w"], update["w"], atol=1e-4)
    np.testing.assert_allclose(memory["w.error"], 0, atol=1e-4)


def test_error_feedback_loses_nothing_over_rounds() -> None:
    """Sent so far + the residual kept = every update so far (the residual is not dropped)."""
    rng = np.random.default_rng(1)
    memory: dict[str, np.ndarray] = {}
    sent, truth = np.zeros((20, 16)), np.zeros((20, 16))
    for _ in range(4):
        update = {"w": rng.standard_normal((20, 16)).astype(np.float32)}
        upload, memory = compress(update, 2, memory, rng)
        sent += decompress(upload, {"w": (20, 16)})["w"]
        truth += update["w"]
    np.testing.assert_allclose(sent + memory["w.error"], truth, atol=1e-4)


def test_lowrank_int8_upload_is_a_tenth_of_the_fp16_promptformer() -> None:
    tensors = initial_promptformer(SHAPE, 0)
    rng = np.random.default_rng(2)
    update = {name: 0.01 * rng.standard_normal(t.shape).astype(np.float32) for name, t in tensors.items()}
    upload, _ = compress(update, 4, {}, rng)
    full_fp16 = len(encode_tensor_set(tensors, "fp16"))
    compact = encode_tensor_set(upload, "int8")
    assert len(compact) * 10 <= full_fp16
    assert set(decode_tensor_set(compact)) == set(upload_shapes(SHAPE.shapes(), "lowrank", 4))
