"""ImageFolder edge cases and the Fashion-MNIST reader, on real files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_client.datasets import (
    FASHION_MNIST_CLASSES,
    DatasetError,
    ImageSet,
    fashion_mnist_dir,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
)


def write_png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_image_folder_sorts_classes_and_skips_other_files(tmp_path: Path) -> None:
    write_png(tmp_path / "zebra" / "a.png", 10)
    write_png(tmp_path / "apple" / "b.PNG", 20)
    write_png(tmp_path / "apple" / "a.png", 30)
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    (tmp_path / ".hidden").mkdir()
    paths, labels, names = load_image_folder(tmp_path)
    assert names == ["apple", "empty_class", "zebra"]
    assert [p.name for p in paths] == ["a.png", "b.PNG", "a.png"]
    assert labels.tolist() == [0, 0, 2]
    assert labels.dtype == np.int64


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("no_classes", "no class sub-folders"),
        ("no_images", "no .jpg/.jpeg/.png images"),
    ],
)
def test_image_folder_errors_are_one_clear_line(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_images":
        (root / "cat").mkdir()
        (root / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=message) as info:
        load_image_folder(root)
    assert "\n" not in str(info.value)


def test_file_and_pixel_backed_sets_give_the_same_rgb_and_digest_changes_with_pixels(tmp_path: Path) -> None:
    pixels = np.stack([np.full((8, 8), 7, np.uint8), np.full((8, 8), 200, np.uint8)])
    write_png(tmp_path / "a" / "0.png", 7)
    write_png(tmp_path / "b" / "0.png", 200)
    from_files = load_dataset(tmp_path)
    in_memory = ImageSet(("a", "b"), np.array([0, 1]), pixels=pixels)
    for index in range(2):
        assert from_files.rgb(index).mode == in_memory.rgb(index).mode == "RGB"
        np.testing.assert_array_equal(np.asarray(from_files.rgb(index)), np.asarray(in_memory.rgb(index)))
    assert in_memory.content_digest(0) != in_memory.content_digest(1)
    before = from_files.content_digest(0)
    assert before != from_files.content_digest(1)
    write_png(tmp_path / "a" / "0.png", 8)
    assert from_files.content_digest(0) != before
    assert in_memory.subset(np.array([1])).labels.tolist() == [1]


def test_unknown_dataset_name_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="neither an existing folder nor a built-in"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown split"):
        load_fashion_mnist("validation")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_round_trips_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 4]))
    monkeypatch.setenv("FEDPROMPT_FASHION_MNIST", str(tmp_path))
    data = load_dataset("fashion-mnist:test")
    np.testing.assert_array_equal(data.pixels, images)
    assert data.labels.tolist() == [9, 0, 4]
    with pytest.raises(DatasetError, match="not found"):
        load_fashion_mnist("train")
    with gzip.open(tmp_path / "bad.gz", "wb") as stream:
        stream.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST data absent (install Debian's dataset-fashion-mnist)",
)
def test_real_fashion_mnist_test_split() -> None:
    data = load_fashion_mnist("test")
    assert data.pixels.shape == (10_000, 28, 28)
    assert data.class_names == FASHION_MNIST_CLASSES
    assert np.bincount(data.labels).tolist() == [1000] * 10
    assert data.rgb(0).size == (28, 28)
