"""Split a labelled dataset over federated clients, non-IID in labels and in image domain.

Label skew comes from a Dirichlet(alpha) draw per class or from a pathological split (k classes
per client). Each client also sees its own image domain (inversion, rotation, low contrast with
noise, colour tints): real pixel transforms, so a model pretrained on clean images loses accuracy
there. Every client is evaluated on a BALANCED held-out set in its own domain, so a client that
only learned the few classes it sees often is scored fairly against one that learned them all.
Partitions are written as ImageFolder trees of PNGs, which is what a real client reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from edge_client.datasets import ImageSet


def _as_rgb(images: np.ndarray) -> np.ndarray:
    """[N,H,W] grayscale or [N,H,W,3] -> float32 [N,H,W,3] in 0..255."""
    images = images.astype(np.float32)
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


def invert(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark object on a light background (Fashion-MNIST is light on dark)."""
    return 255.0 - _as_rgb(images)


def rotate(images: np.ndarray, rng: np.random.Generator, degrees: float = 25.0) -> np.ndarray:
    """The garment turned by `degrees` (bilinear, black corners like the background)."""
    turned = [
        np.asarray(Image.fromarray(image).rotate(degrees, resample=Image.Resampling.BILINEAR))
        for image in np.asarray(images, dtype=np.uint8)
    ]
    return _as_rgb(np.stack(turned))


def low_contrast_noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Washed-out grey image with sensor noise."""
    rgb = _as_rgb(images) * 0.5 + 60.0
    return rgb + rng.normal(0.0, 20.0, size=rgb.shape[:3])[..., None]


def tinted(colour: tuple[float, float, float]) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """A shift that multiplies the channels by `colour`: the channels no longer agree, unlike the
    grayscale pretraining images."""

    def tint(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _as_rgb(images) * np.asarray(colour, dtype=np.float32)

    return tint


def identity(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _as_rgb(images)


DOMAIN_SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "clean": identity,
    "invert": invert,
    "rotate": rotate,
    "contrast-noise": low_contrast_noise,
    "tint-orange": tinted((1.0, 0.7, 0.35)),
    "tint-blue": tinted((0.35, 0.7, 1.0)),
    "tint-green": tinted((0.45, 1.0, 0.45)),
    "tint-red": tinted((1.0, 0.45, 0.3)),
    "tint-yellow": tinted((1.0, 0.95, 0.3)),
    "tint-cyan": tinted((0.3, 0.95, 1.0)),
}


def apply_shift(name: str, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The named domain shift on uint8 images -> uint8 [N,H,W,3]."""
    if name not in DOMAIN_SHIFTS:
        raise ValueError(f"unknown domain shift {name!r}; choose from {', '.join(DOMAIN_SHIFTS)}")
    return np.clip(np.rint(DOMAIN_SHIFTS[name](images, rng)), 0, 255).astype(np.uint8)


def dirichlet_label_split(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_per_client: int = 10
) -> list[np.ndarray]:
    """Per class, hand its examples to clients in Dirichlet(alpha) proportions; small alpha means
    strong skew. Redrawn until every client has at least `min_per_client` examples."""
    if min_per_client * num_clients > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients {min_per_client} each")
    for _attempt in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients))[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        split = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in split) >= min_per_client:
            return split
    raise ValueError(f"no Dirichlet({alpha}) draw gave every client {min_per_client} examples; raise alpha")


def pathological_split(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client holds exactly `classes_per_client` classes: consecutive runs of a shuffled class
    order, wrapping around, so that every class has an owner once clients x k >= classes. A class's
    examples are shared evenly among its owners."""
    classes = rng.permutation(np.unique(labels))
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(f"classes_per_client must be in 1..{len(classes)}")
    owned = [
        {classes[(c * classes_per_client + j) % len(classes)] for j in range(classes_per_client)}
        for c in range(num_clients)
    ]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in classes:
        holders = [c for c in range(num_clients) if label in owned[c]]
        if not holders:
            continue
        members = rng.permutation(np.flatnonzero(labels == label))
        for holder, chunk in zip(holders, np.array_split(members, len(holders)), strict=False):
            parts[holder].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


def balanced_eval_split(
    labels: np.ndarray, num_clients: int, per_class: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Disjoint held-out sets with exactly `per_class` examples of every class for each client."""
    classes = np.unique(labels)
    sets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in classes:
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < per_class * num_clients:
            raise ValueError(f"class {label} has {len(members)} examples, need {per_class * num_clients}")
        for client in range(num_clients):
            sets[client].append(members[client * per_class : (client + 1) * per_class])
    return [np.sort(np.concatenate(s)) for s in sets]


@dataclass(frozen=True)
class ClientSplit:
    """One client's share: indices into the train pool and the eval pool, and its image domain."""

    client: int
    train_indices: np.ndarray
    eval_indices: np.ndarray
    shift: str


@dataclass(frozen=True)
class SplitSettings:
    """How to split; recorded by the demo and the experiment harness next to their results."""

    num_clients: int = 6
    scheme: str = "dirichlet"  # or "pathological"
    alpha: float = 0.1
    classes_per_client: int = 2
    shifts: tuple[str, ...] = ("tint-orange", "rotate", "tint-blue", "contrast-noise")
    max_train_per_client: int | None = None
    eval_per_class: int = 50
    seed: int = 0


def make_splits(
    train_labels: np.ndarray, eval_labels: np.ndarray, settings: SplitSettings
) -> list[ClientSplit]:
    """Label-skewed train partitions, balanced eval sets, and a domain per client (cycled through
    `settings.shifts`), all determined by `settings.seed`."""
    rng = np.random.default_rng(settings.seed)
    if settings.scheme == "dirichlet":
        train = dirichlet_label_split(train_labels, settings.num_clients, settings.alpha, rng)
    elif settings.scheme == "pathological":
        train = pathological_split(train_labels, settings.num_clients, settings.classes_per_client, rng)
    else:
        raise ValueError(f"unknown split scheme {settings.scheme!r}; choose dirichlet or pathological")
    if settings.max_train_per_client is not None:
        limit = settings.max_train_per_client
        train = [np.sort(rng.choice(t, size=limit, replace=False)) if len(t) > limit else t for t in train]
    held_out = balanced_eval_split(eval_labels, settings.num_clients, settings.eval_per_class, rng)
    return [
        ClientSplit(c, train[c], held_out[c], settings.shifts[c % len(settings.shifts)])
        for c in range(settings.num_clients)
    ]


def write_image_folder(root: Path, images: ImageSet, indices: np.ndarray, shift: str, seed: int) -> Path:
    """Write `images[indices]` under `shift` as `root/class_name/NNNNN.png`, with a folder for every
    class (possibly empty) so that every client numbers the classes alike."""
    for name in images.class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    if images.pixels is None:
        raise ValueError("write_image_folder needs an in-memory (pixel-backed) ImageSet")
    shifted = apply_shift(shift, images.pixels[indices], np.random.default_rng(seed))
    for pixels, index in zip(shifted, indices, strict=True):
        Image.fromarray(pixels).save(root / images.class_names[images.labels[index]] / f"{index:05d}.png")
    return root


def materialise_clients(
    root: Path, train_pool: ImageSet, eval_pool: ImageSet, splits: Sequence[ClientSplit], seed: int = 0
) -> list[tuple[Path, Path]]:
    """Write `root/client_K/{train,eval}` ImageFolder trees; returns (train_dir, eval_dir) per client."""
    folders = []
    for split in tqdm(splits, desc="writing client data", unit="client"):
        base = root / f"client_{split.client}"
        train_dir = write_image_folder(
            base / "train", train_pool, split.train_indices, split.shift, seed + split.client
        )
        eval_dir = write_image_folder(
            base / "eval", eval_pool, split.eval_indices, split.shift, seed + 1000 + split.client
        )
        folders.append((train_dir, eval_dir))
    return folders
