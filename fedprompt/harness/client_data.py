"""The clients of one experiment seed: split the image pools, shift each client's pixels into its
domain, and load one `ClientWorkspace` per client (image features cached once, shared by every
method of the seed).

Every method of a seed gets the SAME clients: `split_id` hashes what defines them (the indices of
every client's training and held-out images and its domain), and is recorded next to each result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client.bundle import Bundle
from edge_client.datasets import ImageSet, load_dataset
from edge_client.device_run import save_classes
from edge_client.workspace import ClientWorkspace, LabelledFeatures, holdout_split
from fedprompt.harness.demo import pretraining_images
from fedprompt.harness.experiment_config import DataConfig, SplitConfig
from fedprompt.harness.splits import ClientSplit, apply_shift, make_splits

BUILTIN_WITH_TEST_SPLIT = "fashion-mnist"
POOL_HOLDOUT_KEY = b"fedprompt experiment pool"  # public: the pools are the experimenter's, not a device's


@dataclass(frozen=True)
class ImagePools:
    """Images clients train on and images their held-out sets are drawn from (disjoint)."""

    train: ImageSet
    evaluation: ImageSet


@dataclass(frozen=True)
class SeedClients:
    """One seed's clients: their splits, loaded workspaces (state in a cache folder, never used for
    training state: each run gets fresh copies) and the id of the split."""

    splits: list[ClientSplit]
    workspaces: list[ClientWorkspace]
    split_id: str
    unseen: list[LabelledFeatures] | None = None  # held-out images in `split.unseen_shift`

    @property
    def domains(self) -> list[str]:
        return [split.shift for split in self.splits]


def load_pools(data: DataConfig, base_dir: Path) -> ImagePools:
    """The training and held-out pools the config names (relative paths from the config's folder)."""
    source = _resolve(data.source, base_dir)
    images = load_dataset(source)
    skip = data.skip_first
    if skip is None:
        skip = pretraining_images() if data.source == BUILTIN_WITH_TEST_SPLIT else 0
    if skip >= len(images):
        raise ValueError(f"data.skip_first={skip} leaves none of the {len(images)} images of {data.source}")
    images = images.subset(np.arange(skip, len(images)))
    if data.eval_source is not None:
        return ImagePools(images, load_dataset(_resolve(data.eval_source, base_dir)))
    if data.source == BUILTIN_WITH_TEST_SPLIT:
        return ImagePools(images, load_dataset(f"{BUILTIN_WITH_TEST_SPLIT}:test"))
    train_idx, eval_idx = holdout_split(images, data.eval_fraction, POOL_HOLDOUT_KEY)
    return ImagePools(images.subset(train_idx), images.subset(eval_idx))


def _resolve(source: str, base_dir: Path) -> str:
    """A relative folder is read from the config's folder; built-in names stay as they are."""
    candidate = base_dir / source
    return str(candidate) if not Path(source).is_absolute() and candidate.exists() else source


def split_id(splits: list[ClientSplit]) -> str:
    """sha256 (first 16 hex digits) of every client's training and held-out indices and domain."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update(f"{split.client}:{split.shift}:".encode())
        digest.update(np.asarray(split.train_indices, np.int64).tobytes() + b"|")
        digest.update(np.asarray(split.eval_indices, np.int64).tobytes() + b";")
    return digest.hexdigest()[:16]


def local_eval_indices(split: ClientSplit, train_labels: np.ndarray, eval_labels: np.ndarray) -> np.ndarray:
    """Of the client's balanced held-out set, each class in proportion to the client's training
    labels: the most frequent class keeps all its held-out images, a class it never saw keeps none."""
    counts = np.bincount(train_labels[split.train_indices], minlength=int(eval_labels.max()) + 1)
    kept = []
    for label in np.flatnonzero(counts):
        members = split.eval_indices[eval_labels[split.eval_indices] == label]
        kept.append(members[: round(len(members) * counts[label] / counts.max())])
    return np.sort(np.concatenate(kept))


def shifted(images: ImageSet, indices: np.ndarray, shift: str, seed: int) -> ImageSet:
    """The images at `indices` moved into the client's domain (real pixel transforms)."""
    subset = images.subset(indices)
    if shift == "clean":
        return subset
    if subset.pixels is None:
        raise ValueError(
            f'domain shift {shift!r} needs in-memory images; use shifts = ["clean"] with folders'
        )
    return ImageSet(
        subset.class_names,
        subset.labels,
        pixels=apply_shift(shift, subset.pixels, np.random.default_rng(seed)),
    )


def seed_clients(
    pools: ImagePools, split: SplitConfig, seed: int, bundle_dir: Path, cache_dir: Path, precision: str | None
) -> SeedClients:
    """Split the pools for `seed` and load every client's workspace (features cached in `cache_dir`)."""
    if pools.train.class_names != pools.evaluation.class_names:
        raise ValueError("the training and held-out pools have different classes")
    splits = make_splits(pools.train.labels, pools.evaluation.labels, split.settings(seed))
    if split.evaluation == "local":
        splits = [
            ClientSplit(
                s.client,
                s.train_indices,
                local_eval_indices(s, pools.train.labels, pools.evaluation.labels),
                s.shift,
            )
            for s in splits
        ]
    if split.base_classes:
        splits = [base_only(s, pools.train.labels, split.base_classes) for s in splits]
    workspaces, unseen = [], []
    bundle = Bundle.open(bundle_dir)
    tower = bundle.text_tower()
    for s in splits:
        train = shifted(pools.train, s.train_indices, s.shift, seed * 10_007 + s.client)
        evaluation = shifted(pools.evaluation, s.eval_indices, s.shift, seed * 10_007 + 5_003 + s.client)
        loaded = ClientWorkspace.load(
            bundle_dir, train, evaluation, state_dir=cache_dir, precision=precision, progress=False
        )
        workspaces.append(
            ClientWorkspace(bundle, tower, loaded.class_names, loaded.train, loaded.evaluation, cache_dir)
        )
        if split.unseen_shift is not None:
            moved = shifted(
                pools.evaluation, s.eval_indices, split.unseen_shift, seed * 10_007 + 7_919 + s.client
            )
            unseen.append(
                ClientWorkspace.load(
                    bundle_dir, moved, moved, state_dir=cache_dir, precision=precision, progress=False
                ).evaluation
            )
    return SeedClients(splits, workspaces, split_id(splits), unseen if split.unseen_shift else None)


def base_only(split: ClientSplit, train_labels: np.ndarray, base_classes: int) -> ClientSplit:
    """The client's split with only its training images of the first `base_classes` classes."""
    if base_classes >= int(train_labels.max()) + 1:
        raise ValueError(f"split.base_classes={base_classes} leaves no new class")
    kept = split.train_indices[train_labels[split.train_indices] < base_classes]
    return ClientSplit(split.client, kept, split.eval_indices, split.shift)


def fresh_workspace(workspace: ClientWorkspace, state_dir: Path) -> ClientWorkspace:
    """The same bundle, tower and features with an empty state folder: a new device for a new run
    (its own privacy accountant and local prompts), without computing any feature again."""
    state_dir.mkdir(parents=True, exist_ok=False)
    save_classes(state_dir, workspace.class_names, workspace.bundle.digest)  # as a device's load does
    return ClientWorkspace(
        workspace.bundle,
        workspace.tower,
        workspace.class_names,
        workspace.train,
        workspace.evaluation,
        state_dir,
    )
