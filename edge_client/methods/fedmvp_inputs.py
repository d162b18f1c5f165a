"""FedMVP's per-example inputs of a local split, computed once: the frozen tower's input tokens of
each image (`FrozenImageTower.embed`: class token and patch embeddings with positions) and the
frozen CLIP feature of the horizontally flipped image (the consistency target).

The official code recomputes the flipped image's features with the frozen encoder in every step;
they never change, so they come from the device's feature cache here, keyed like the unflipped
features (encoder, precision, preprocessing, the flip, each image's content) and computed by the
ONNX image encoder once per image and bundle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_client.bundle import Bundle
from edge_client.datasets import ImageSet
from edge_client.features import image_features
from edge_client.image_tower import FrozenImageTower
from edge_client.preprocess import ImagePreprocessor
from edge_client.training import Inputs, normalise

BATCH = 64


@torch.no_grad()
def embedded_images(images: ImageSet, bundle: Bundle, tower: FrozenImageTower) -> torch.Tensor:
    """[N, 1+T, Wv] input tokens of the frozen tower, from the bundle's preprocessing."""
    preprocess = ImagePreprocessor(bundle.preprocess)
    chunks = []
    for start in range(0, len(images), BATCH):
        indices = range(start, min(start + BATCH, len(images)))
        pixels = torch.from_numpy(np.stack([preprocess(images.rgb(i)) for i in indices]))
        chunks.append(tower.embed(pixels))
    if not chunks:
        spec = tower.spec
        return torch.zeros(0, 1 + spec.tokens, spec.width)
    return torch.cat(chunks)


def flipped_features(images: ImageSet, bundle: Bundle, cache_dir: Path) -> torch.Tensor:
    """[N, D] normalised frozen features of the flipped images, through the feature cache."""
    if len(images) == 0:
        return torch.zeros(0, bundle.embed_dim)
    features, _ = image_features(images, bundle, cache_dir, progress=False, flip=True)
    return normalise(torch.from_numpy(features))


def fedmvp_inputs(images: ImageSet, bundle: Bundle, tower: FrozenImageTower, cache_dir: Path) -> Inputs:
    """(embedded images, flipped-image features) of a split."""
    return embedded_images(images, bundle, tower), flipped_features(images, bundle, cache_dir)
