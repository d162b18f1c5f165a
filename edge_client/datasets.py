"""Labelled images for a client: an ImageFolder tree on disk or a built-in dataset by name.

Both kinds come back as one `ImageSet`, so the feature extractor needs a single code path: it asks
for `rgb(i)` (a PIL image) and `content_digest(i)` (a cache key that changes when the pixels do).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "FEDPROMPT_FASHION_MNIST"
# Folder-safe names (the dataset's own "T-shirt/top" has a slash) that read well inside a prompt.
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
BUILTIN_DATASETS = ("fashion-mnist",)
SPLITS = ("train", "test")


class DatasetError(click.ClickException, ValueError):
    """Bad dataset input (missing folder, no images, unknown name). A ClickException, so any command
    that lets it through prints one clear line instead of a traceback."""


@dataclass(frozen=True)
class ImageSet:
    """Labelled images backed by files (`paths`) or by in-memory uint8 pixels (`pixels`, [N,H,W] or
    [N,H,W,3]); exactly one of the two is set."""

    class_names: tuple[str, ...]
    labels: np.ndarray
    paths: tuple[Path, ...] | None = None
    pixels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.paths is None) == (self.pixels is None):
            raise ValueError("an ImageSet needs exactly one of paths or pixels")
        if len(self.labels) != len(self.paths if self.paths is not None else self.pixels):
            raise ValueError("labels and images differ in length")

    def __len__(self) -> int:
        return len(self.labels)

    def rgb(self, index: int) -> Image.Image:
        """The image as 3-channel PIL (grayscale is replicated), ready for the bundle's preprocessing."""
        if self.paths is not None:
            with Image.open(self.paths[index]) as image:
                return image.convert("RGB")
        return Image.fromarray(self.pixels[index]).convert("RGB")

    def iter_rgb(self) -> Iterator[Image.Image]:
        for index in range(len(self)):
            yield self.rgb(index)

    def content_digest(self, index: int) -> str:
        """sha256 of the file's bytes or of the pixel array: a cache key for this image's features."""
        if self.paths is not None:
            return hashlib.sha256(self.paths[index].read_bytes()).hexdigest()
        pixels = np.ascontiguousarray(self.pixels[index])
        return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()

    def readable(self) -> tuple[ImageSet, list[str]]:
        """The images that decode, and one line for each that does not (for `--skip-bad-images`:
        one corrupt file need not stop a device). In-memory pixels always decode."""
        if self.paths is None:
            return self, []
        keep, bad = [], []
        for index, path in enumerate(self.paths):
            try:
                self.rgb(index)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                bad.append(f"{path}: {error}")
            else:
                keep.append(index)
        return (self.subset(np.asarray(keep)) if bad else self), bad

    def subset(self, indices: np.ndarray) -> ImageSet:
        """The images at `indices`, same class names (used to split data over clients)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.paths is not None:
            paths = tuple(self.paths[i] for i in indices)
            return ImageSet(self.class_names, self.labels[indices], paths=paths)
        return ImageSet(self.class_names, self.labels[indices], pixels=self.pixels[indices])


def load_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Read `root/class_name/*.jpg|jpeg|png`: file paths, int64 labels, sorted class names.

    Classes are sorted so that every client of a federation numbers them the same way. A class
    folder without images is kept (a client may lack a class) but a tree without any image is an
    error, as is a missing root.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder")
    class_names = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
    if not class_names:
        raise DatasetError(f"data folder {root} has no class sub-folders (expected root/class_name/*.png)")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise DatasetError(f"data folder {root} has class folders but no .jpg/.jpeg/.png images in them")
    return paths, np.asarray(labels, dtype=np.int64), class_names


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST IDX files are: $FEDPROMPT_FASHION_MNIST or Debian's package folder."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format: big-endian magic, dims, then uint8 data)."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(f"{path} is not an uint8 IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def load_fashion_mnist(split: str = "train") -> ImageSet:
    """Fashion-MNIST (Zalando, MIT): 28x28 grayscale, 60k train / 10k test, 10 clothing classes."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    prefix = "train" if split == "train" else "t10k"
    folder = fashion_mnist_dir()
    images_file = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_file = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.is_file() or not labels_file.is_file():
        raise DatasetError(
            f"Fashion-MNIST not found in {folder}: install Debian's dataset-fashion-mnist "
            f"or set {FASHION_MNIST_ENV} to a folder with its *-idx*-ubyte.gz files"
        )
    pixels, labels = read_idx(images_file), read_idx(labels_file)
    if len(pixels) != len(labels):
        raise DatasetError(f"Fashion-MNIST in {folder}: {len(pixels)} images but {len(labels)} labels")
    return ImageSet(FASHION_MNIST_CLASSES, labels.astype(np.int64), pixels=pixels)


def load_dataset(spec: str | Path) -> ImageSet:
    """A built-in dataset (`fashion-mnist`, `fashion-mnist:test`) or an ImageFolder path.

    An existing path wins over a built-in name, so a folder that happens to be called
    `fashion-mnist` is still read as a folder.
    """
    text = str(spec)
    if Path(text).exists():
        paths, labels, class_names = load_image_folder(text)
        return ImageSet(tuple(class_names), labels, paths=tuple(paths))
    name, _, split = text.partition(":")
    if name in BUILTIN_DATASETS:
        return load_fashion_mnist(split or "train")
    raise DatasetError(
        f"{text!r} is neither an existing folder nor a built-in dataset ({', '.join(BUILTIN_DATASETS)})"
    )
