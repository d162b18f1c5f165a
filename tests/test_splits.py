"""Client splits: label-skew statistics, balanced held-out sets, determinism, real pixel shifts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_client.datasets import ImageSet, load_image_folder
from fedprompt.harness.splits import (
    DOMAIN_SHIFTS,
    SplitSettings,
    apply_shift,
    dirichlet_label_split,
    make_splits,
    materialise_clients,
    pathological_split,
)

LABELS = np.repeat(np.arange(10), 200)  # 2000 examples, 10 balanced classes


def top_class_share(parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of the client's most frequent class (0.1 = IID, 1 = one class)."""
    return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))


def assert_partition(parts: list[np.ndarray], size: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == size and len(np.unique(joined)) == size


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skewed = dirichlet_label_split(LABELS, 8, 0.1, np.random.default_rng(0))
    near_iid = dirichlet_label_split(LABELS, 8, 100.0, np.random.default_rng(0))
    assert_partition(skewed, len(LABELS))
    assert_partition(near_iid, len(LABELS))
    assert top_class_share(skewed) > 0.5
    assert top_class_share(near_iid) < 0.2
    assert min(len(p) for p in skewed) >= 10


def test_pathological_gives_exactly_k_classes_and_covers_all() -> None:
    parts = pathological_split(LABELS, 6, 2, np.random.default_rng(1))
    assert_partition(parts, len(LABELS))
    assert all(len(np.unique(LABELS[p])) == 2 for p in parts)
    assert set(np.concatenate([LABELS[p] for p in parts])) == set(range(10))


def test_eval_sets_are_balanced_disjoint_and_splits_deterministic() -> None:
    settings = SplitSettings(num_clients=5, eval_per_class=7, seed=3, max_train_per_client=150)
    splits = make_splits(LABELS, LABELS, settings)
    for split in splits:
        assert np.bincount(LABELS[split.eval_indices], minlength=10).tolist() == [7] * 10
        assert len(split.train_indices) <= 150
    assert len(np.unique(np.concatenate([s.eval_indices for s in splits]))) == 5 * 70
    assert [s.shift for s in splits] == [
        "tint-orange",
        "rotate",
        "tint-blue",
        "contrast-noise",
        "tint-orange",
    ]
    again = make_splits(LABELS, LABELS, settings)
    other = make_splits(LABELS, LABELS, replace(settings, seed=4))
    for a, b in zip(splits, again, strict=True):
        np.testing.assert_array_equal(a.train_indices, b.train_indices)
        np.testing.assert_array_equal(a.eval_indices, b.eval_indices)
    assert any(
        not np.array_equal(a.train_indices, b.train_indices) for a, b in zip(splits, other, strict=True)
    )


@pytest.mark.parametrize("shift", sorted(set(DOMAIN_SHIFTS) - {"clean"}))
def test_every_shift_changes_pixels(shift: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 12, 12), dtype=np.uint8)
    clean = apply_shift("clean", images, rng)
    shifted = apply_shift(shift, images, np.random.default_rng(1))
    assert shifted.shape == clean.shape == (4, 12, 12, 3) and shifted.dtype == np.uint8
    assert np.abs(shifted.astype(int) - clean.astype(int)).mean() > 20


def test_materialised_trees_read_back_with_every_class_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = ("bag", "coat", "dress")
    pixels = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 20)
    pool = ImageSet(names, labels, pixels=pixels)
    settings = SplitSettings(num_clients=2, scheme="pathological", classes_per_client=1, eval_per_class=3)
    splits = make_splits(labels, labels, settings)
    (train_dir, eval_dir), _ = materialise_clients(tmp_path, pool, pool, splits)
    paths, read_labels, read_names = load_image_folder(train_dir)
    assert read_names == list(names)
    assert len(paths) == len(splits[0].train_indices)
    np.testing.assert_array_equal(np.sort(read_labels), np.sort(labels[splits[0].train_indices]))
    first = int(paths[0].stem)
    expected = apply_shift(splits[0].shift, pixels[splits[0].train_indices], np.random.default_rng(0))
    position = list(splits[0].train_indices).index(first)
    np.testing.assert_array_equal(np.asarray(Image.open(paths[0])), expected[position])
    _, eval_labels, _ = load_image_folder(eval_dir)
    assert np.bincount(eval_labels).tolist() == [3, 3, 3]
