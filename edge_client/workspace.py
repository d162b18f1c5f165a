"""Everything a client method needs on the device, loaded once: the verified bundle, the frozen
text tower, the class names, cached image features of the training and evaluation images, and a
state folder for what must survive restarts (privacy accountant, local prompts).

Methods are built as `CLIENT_METHODS[name](workspace)` and keep no data of their own beyond it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_client.bundle import Bundle
from edge_client.datasets import DatasetError, ImageSet, load_dataset
from edge_client.device_run import save_classes
from edge_client.features import image_features
from edge_client.preprocess import PreprocessError
from edge_client.prompt_encoder import PromptTextEncoder
from edge_client.prompts import PromptError, tokenize_class_prompts
from edge_client.text_tower import FrozenTextTower
from edge_client.training import normalise
from fedprompt.common.files import write_atomically

FEATURES_DIR = "features"
HOLDOUT_KEY_FILE = "holdout.key"


class WorkspaceError(Exception):
    """Data or settings a user gave cannot be used (empty folder, mismatched classes, ...);
    the message is one line for the CLI to print."""


@dataclass(frozen=True)
class LabelledFeatures:
    """Normalised image features [N, D] and labels [N] of one local split, and its images for
    methods that train through the image tower (None where only features exist)."""

    features: torch.Tensor
    labels: torch.Tensor
    images: ImageSet | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features, self.labels


def holdout_split(images: ImageSet, fraction: float, key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): each image is held out when HMAC-SHA256(key, its content
    digest), read as a number in [0, 1), is below `fraction`.

    Each image's side depends on its own content and the key only, so adding or removing one image
    moves no other image between the sides: DP-SGD's example-level guarantee then covers an example
    of the device's data, not only of one particular split of it (a seeded permutation per class
    moved dozens of other images when one was added). Identical images fall on the same side.
    """
    held = held_out([images.content_digest(index) for index in range(len(images))], fraction, key)
    return np.flatnonzero(~held), np.flatnonzero(held)


def held_out(digests: Sequence[str], fraction: float, key: bytes) -> np.ndarray:
    """[N] bool: which items (by hex content digest) `holdout_split`'s keyed hash holds out."""
    held = np.zeros(len(digests), dtype=bool)
    for index, digest in enumerate(digests):
        tag = hmac.new(key, bytes.fromhex(digest), hashlib.sha256).digest()
        held[index] = int.from_bytes(tag[:8], "big") < fraction * 2**64
    return held


def holdout_key(state_dir: Path) -> bytes:
    """The device's secret hold-out key, made once from OS entropy and kept in its state folder (so
    the split stays the same across restarts and no one else can predict it)."""
    path = Path(state_dir) / HOLDOUT_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, secrets.token_bytes(32))
    key = path.read_bytes()
    if len(key) != 32:
        raise WorkspaceError(f"{path} is not a 32-byte hold-out key; remove it to make a new split")
    return key


class ClientWorkspace:
    """A client's bundle, tower and local data as cached features."""

    def __init__(
        self,
        bundle: Bundle,
        tower: FrozenTextTower,
        class_names: Sequence[str],
        train: LabelledFeatures,
        evaluation: LabelledFeatures,
        state_dir: Path,
    ) -> None:
        self.bundle = bundle
        self.tower = tower
        self.class_names = tuple(class_names)
        self.train = train
        self.evaluation = evaluation
        self.state_dir = Path(state_dir)
        self.logit_scale = bundle.logit_scale
        self._encoders: dict[tuple[int, str], PromptTextEncoder] = {}

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        train_data: str | Path | ImageSet,
        eval_data: str | Path | ImageSet | None = None,
        state_dir: str | Path = "fedprompt-client-state",
        precision: str | None = None,
        providers: Sequence[str] | None = None,
        holdout_fraction: float = 0.2,
        holdout_secret: bytes | None = None,
        progress: bool = True,
    ) -> ClientWorkspace:
        """Open and verify the bundle, read the data, compute (or reuse cached) image features.

        Without `eval_data`, about `holdout_fraction` of the training images are held out for local
        evaluation, each by a keyed hash of its content (`holdout_split`; the key is
        `holdout_secret`, by default the device's own from `holdout_key`). Bad data raises
        WorkspaceError, a bad bundle BundleError.
        """
        bundle = Bundle.open(bundle_dir)
        state_dir = Path(state_dir)
        try:
            train_images = _images(train_data)
            if eval_data is None:
                key = holdout_secret if holdout_secret is not None else holdout_key(state_dir)
                train_idx, eval_idx = holdout_split(train_images, holdout_fraction, key)
                train_images, eval_images = train_images.subset(train_idx), train_images.subset(eval_idx)
            else:
                eval_images = _images(eval_data)
                if eval_images.class_names != train_images.class_names:
                    raise WorkspaceError(
                        f"evaluation classes {list(eval_images.class_names)} differ from training classes "
                        f"{list(train_images.class_names)}"
                    )
            splits = [
                _featurise(images, bundle, state_dir / FEATURES_DIR, precision, providers, progress)
                for images in (train_images, eval_images)
            ]
        except (DatasetError, PreprocessError) as error:
            raise WorkspaceError(str(error)) from None
        workspace = cls(bundle, bundle.text_tower(), train_images.class_names, *splits, state_dir)
        workspace.state_dir.mkdir(parents=True, exist_ok=True)
        save_classes(workspace.state_dir, workspace.class_names, bundle.digest)
        return workspace

    @property
    def text_width(self) -> int:
        return self.tower.token_embedding.shape[1]

    def text_encoder(self, n_ctx: int, encoding: str = "shared") -> PromptTextEncoder:
        """ctx [n_ctx, W] -> class text features, built once per (n_ctx, encoding)."""
        key = (n_ctx, encoding)
        if key not in self._encoders:
            eot_token_id = int(self.bundle.manifest["tokenizer"]["eot_token_id"])
            try:
                tokens = tokenize_class_prompts(
                    self.bundle.tokenizer(), self.class_names, n_ctx, eot_token_id
                )
            except PromptError as error:
                raise WorkspaceError(str(error)) from None
            self._encoders[key] = PromptTextEncoder(self.tower, tokens, encoding)
        return self._encoders[key]


def _images(data: str | Path | ImageSet) -> ImageSet:
    return data if isinstance(data, ImageSet) else load_dataset(data)


def _featurise(
    images: ImageSet,
    bundle: Bundle,
    cache_dir: Path,
    precision: str | None,
    providers: Sequence[str] | None,
    progress: bool,
) -> LabelledFeatures:
    if len(images) == 0:
        return LabelledFeatures(torch.zeros(0, bundle.embed_dim), torch.zeros(0, dtype=torch.int64))
    features, _ = image_features(images, bundle, cache_dir, precision, providers, progress=progress)
    return LabelledFeatures(normalise(torch.from_numpy(features)), torch.from_numpy(images.labels), images)
