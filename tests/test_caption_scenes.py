"""Captioned scenes from real Fashion-MNIST images: seeded, captions generated from the scene in every
style, one token per word of the tiny captioner's vocabulary, written as a folder the device reads;
BLEU-4 and CIDEr-D from pycocoevalcap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_client.caption_data import load_captioned_folder
from edge_client.datasets import FASHION_MNIST_CLASSES, DatasetError, ImageSet
from fedprompt.harness.caption_metrics import caption_scores
from fedprompt.harness.caption_scenes import (
    CANVAS,
    CELL,
    HELD_OUT_STYLES,
    POSITIONS,
    STYLES,
    TRAIN_STYLES,
    Scene,
    caption,
    caption_words,
    draw_scenes,
    item_word,
    write_scenes,
)
from fedprompt.harness.pretrain_captioner import SPECIAL, word_tokenizer


def fake_items(n: int = 40) -> ImageSet:
    rng = np.random.default_rng(0)
    pixels = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
    return ImageSet(FASHION_MNIST_CLASSES, np.arange(n) % 10, pixels=pixels)


def test_scenes_are_seeded_and_place_each_item_in_its_cell() -> None:
    images = fake_items()
    a, scenes = draw_scenes(images, 20, ("grey",), np.random.default_rng(3))
    b, again = draw_scenes(images, 20, ("grey",), np.random.default_rng(3))
    assert np.array_equal(a, b) and scenes == again
    assert a.shape == (20, CANVAS, CANVAS, 3)
    for canvas, scene in zip(a, scenes, strict=True):
        occupied = {c for c, _ in scene.items}
        assert 1 <= len(occupied) == len(scene.items) <= 4
        for cell in range(4):
            row, col = divmod(cell, 2)
            block = canvas[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
            assert (block.max() > 0) == (cell in occupied)


def test_captions_say_what_how_many_where_and_which_cast() -> None:
    scene = Scene(((0, "bag"), (3, "ankle-boot")), "orange")
    assert (
        caption(scene, "where")
        == "a bag at the top left and an ankle-boot at the bottom right on a orange background"
    )
    assert caption(scene, "count").startswith("two items in orange light")
    assert set(TRAIN_STYLES).isdisjoint(HELD_OUT_STYLES) and set(STYLES) == {*TRAIN_STYLES, *HELD_OUT_STYLES}
    for style in STYLES:
        text = caption(scene, style)
        assert "orange" in text and "bag" in text and "ankle-boot" in text


def test_every_caption_is_one_token_per_word() -> None:
    words = caption_words([item_word(c) for c in FASHION_MNIST_CLASSES])
    tokenizer = word_tokenizer(words)
    scene = Scene(((1, "t-shirt"), (2, "sneaker")), "cyan")
    for style in STYLES:
        text = caption(scene, style)
        ids = tokenizer.encode(text).ids
        assert len(ids) == len(text.split()) and min(ids) >= len(SPECIAL)
        assert tokenizer.decode(ids) == text
    assert {w for p in POSITIONS for w in p.split()} <= set(words)


def test_written_scenes_read_back_with_their_captions(tmp_path: Path) -> None:
    canvases, scenes = draw_scenes(fake_items(), 3, ("red",), np.random.default_rng(0))
    texts = [caption(s, "plain") for s in scenes]
    write_scenes(tmp_path / "s", canvases, texts)
    data = load_captioned_folder(tmp_path / "s")
    assert data.captions == tuple(texts) and all(p.is_file() for p in data.paths)
    (tmp_path / "s" / "captions.txt").write_text("missing.png\tx\n")
    with pytest.raises(DatasetError, match="line 1"):
        load_captioned_folder(tmp_path / "s")


def test_bleu4_and_cider_d_rank_a_right_caption_above_a_wrong_one() -> None:
    refs = [
        ["a bag at the top left on a red background", "red bag"],
        ["a coat at the top right on a blue background"],
    ]
    right = caption_scores(
        refs, ["a bag at the top left on a red background", "a coat at the top right on a blue background"]
    )
    wrong = caption_scores(
        refs, ["a coat at the bottom right on a green background", "a bag at the top left"]
    )
    assert right["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert right["cider_d"] > wrong["cider_d"] and right["bleu4"] > wrong["bleu4"]
