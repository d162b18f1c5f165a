"""A captioning device's workspace: the verified bundle with its frozen captioner, the captioned
images of a folder (`captions.txt`) as cached caption features (pooled feature and patch tokens)
with their captions' token ids, split into training and a local hold-out as the classification
workspace splits its images (a keyed hash of each image's content, `edge_client.workspace`), and
the state folder. `fedprompt client run` opens one for a data folder with a `captions.txt`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from edge_client.bundle import Bundle
from edge_client.caption_data import (
    CAPTIONS_FILE,
    CaptionedImages,
    cached_caption_features,
    load_captioned_folder,
)
from edge_client.caption_training import caption_labels
from edge_client.captioner import Captioner
from edge_client.datasets import DatasetError
from edge_client.workspace import FEATURES_DIR, WorkspaceError, held_out, holdout_key


def is_captioned_folder(data: str | Path) -> bool:
    return (Path(data) / CAPTIONS_FILE).is_file()


@dataclass(frozen=True)
class CaptionedFeatures:
    """One local split: image features [N,D], patch tokens [N,T,W], caption token ids [N,L]
    (-100 = padding) and the captions themselves."""

    features: torch.Tensor
    patches: torch.Tensor
    labels: torch.Tensor
    captions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.captions)


class CaptionWorkspace:
    def __init__(
        self, bundle: Bundle, train: CaptionedFeatures, evaluation: CaptionedFeatures, state_dir: Path
    ):
        self.bundle = bundle
        self.train = train
        self.evaluation = evaluation
        self.state_dir = Path(state_dir)

    @cached_property
    def captioner(self) -> Captioner:
        return self.bundle.captioner()

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        data: str | Path,
        eval_data: str | Path | None = None,
        state_dir: str | Path = "fedprompt-client-state",
        holdout_fraction: float = 0.2,
        holdout_secret: bytes | None = None,
    ) -> CaptionWorkspace:
        """Without `eval_data`, about `holdout_fraction` of the images are held out by the device's
        keyed hash of their content (key `holdout_secret`, by default the device's own)."""
        bundle = Bundle.open(bundle_dir)
        bundle.require("captioning")
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            train = load_captioned_folder(data)
            if eval_data is None:
                key = holdout_secret if holdout_secret is not None else holdout_key(state_dir)
                digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in train.paths]
                held = held_out(digests, holdout_fraction, key)
                evaluation = _subset(train, held)
                train = _subset(train, ~held)
            else:
                evaluation = load_captioned_folder(eval_data)
        except DatasetError as error:
            raise WorkspaceError(str(error)) from None
        if not train.paths:
            raise WorkspaceError(
                f"{data}: every captioned image was held out; add images or give --eval-data"
            )
        splits = [_featurise(bundle, images, state_dir / FEATURES_DIR) for images in (train, evaluation)]
        return cls(bundle, *splits, state_dir)


def _subset(images: CaptionedImages, keep: object) -> CaptionedImages:
    chosen = [i for i, k in enumerate(keep) if k]
    return CaptionedImages(tuple(images.paths[i] for i in chosen), tuple(images.captions[i] for i in chosen))


def _featurise(bundle: Bundle, images: CaptionedImages, cache_dir: Path) -> CaptionedFeatures:
    width = int(bundle.manifest["image_width"])
    if not images.paths:
        empty = torch.zeros(0, 0)
        return CaptionedFeatures(torch.zeros(0, bundle.embed_dim), torch.zeros(0, 0, width), empty, ())
    features, patches, _ = cached_caption_features(bundle, images.paths, cache_dir)
    labels = caption_labels(bundle.caption_tokenizer(), images.captions)
    return CaptionedFeatures(torch.from_numpy(features), torch.from_numpy(patches), labels, images.captions)
