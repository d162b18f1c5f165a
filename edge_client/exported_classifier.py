"""A device's classifier as a folder that runs with onnxruntime alone: no torch, no bundle.

`fedprompt export-classifier` writes it (`edge_client.classifier_export`): the bundle's ONNX image
encoder, the method's head with the class text features baked in as `head.onnx`, and
`classifier.json` naming the run, round, method, classes, preprocessing, the epsilon the device
spent and the sha256 of both graphs (checked at every open). Run it where torch is not installed:

    python -m edge_client.exported_classifier CLASSIFIER_DIR IMAGES... [--data DIR] [--json FILE]

This module and what it imports (preprocessing, image folders, provider choice) import no torch;
`fedprompt predict` prints its results with the same helpers, so both read alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from edge_client.datasets import DatasetError, ImageSet, load_image_folder
from edge_client.preprocess import ImagePreprocessor
from edge_client.providers import make_session

CLASSIFIER_MANIFEST = "classifier.json"
ENCODER_FILE = "image_encoder.onnx"
HEAD_FILE = "head.onnx"


class ClassifierError(click.ClickException, ValueError):
    """An exported classifier folder that is missing, altered or not one (one line for the CLI)."""


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, best first, with their softmax probabilities."""

    image: str
    labels: tuple[str, ...]
    scores: tuple[float, ...]


def top_k(
    logits: np.ndarray, class_names: Sequence[str], k: int
) -> list[tuple[tuple[str, ...], tuple[float, ...]]]:
    """Per row of logits [N, K], the k most likely class names and their probabilities."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    order = np.argsort(-logits, axis=1, kind="stable")[:, : min(k, len(class_names))]
    return [
        (tuple(class_names[i] for i in row), tuple(float(probabilities[n, i]) for i in row))
        for n, row in enumerate(order)
    ]


def predictions(images: ImageSet, logits: np.ndarray, k: int) -> list[Prediction]:
    names = [str(path) for path in images.paths or ()]
    return [
        Prediction(name, *best)
        for name, best in zip(names, top_k(logits, images.class_names, k), strict=True)
    ]


def accuracy_of(images: ImageSet, logits: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == images.labels).mean())


def report(found: Sequence[Prediction], accuracy: float | None, about: dict[str, Any]) -> dict[str, Any]:
    """The JSON both commands write: what classified, each image's top-k, and the accuracy."""
    return {
        **about,
        "accuracy": accuracy,
        "predictions": [
            {"image": p.image, "labels": list(p.labels), "scores": [round(s, 6) for s in p.scores]}
            for p in found
        ],
    }


def echo_predictions(found: Sequence[Prediction], accuracy: float | None, labelled: int) -> None:
    for p in found:
        best = zip(p.labels, p.scores, strict=True)
        click.echo(f"{p.image}: " + ", ".join(f"{label} {score:.3f}" for label, score in best))
    if accuracy is not None:
        click.echo(f"accuracy {accuracy:.4f} on {labelled} labelled images")


def unlabelled(paths: Sequence[str | Path], class_names: Sequence[str]) -> ImageSet:
    """Loose image files to classify (their labels are placeholders)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(f"no such image file: {missing[0]}")
    return ImageSet(tuple(class_names), np.zeros(len(paths), np.int64), paths=tuple(Path(p) for p in paths))


def labelled(folder: str | Path, class_names: Sequence[str]) -> ImageSet:
    """An ImageFolder tree whose classes must be the classifier's, in the same order."""
    paths, labels, names = load_image_folder(folder)
    if tuple(names) != tuple(class_names):
        raise DatasetError(f"{folder} has classes {names}; this classifier knows {list(class_names)}")
    return ImageSet(tuple(names), labels, paths=tuple(paths))


def encode_images(
    session: Any, preprocess: ImagePreprocessor, images: ImageSet, batch: int = 32
) -> np.ndarray:
    """Normalised image features [N, D] from an ONNX image encoder."""
    rows = []
    for start in range(0, len(images), batch):
        pixels = np.stack([preprocess(images.rgb(i)) for i in range(start, min(start + batch, len(images)))])
        rows.append(encode_pixels(session, pixels))
    return np.concatenate(rows)


def encode_pixels(session: Any, pixels: np.ndarray) -> np.ndarray:
    """Normalised features of a preprocessed batch [B, 3, H, W]."""
    (features,) = session.run(["image_features"], {"images": pixels})
    features = features.astype(np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ExportedClassifier:
    """An opened classifier folder; both graphs checked against their sha256."""

    def __init__(self, folder: str | Path, providers: Sequence[str] | None = None) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / CLASSIFIER_MANIFEST
        if not manifest_path.is_file():
            raise ClassifierError(
                f"{self.folder} is not an exported classifier: {CLASSIFIER_MANIFEST} is missing"
            )
        self.manifest = json.loads(manifest_path.read_text())
        for name, digest in self.manifest["files"].items():
            if not (self.folder / name).is_file() or _sha256(self.folder / name) != digest:
                raise ClassifierError(
                    f"{self.folder / name} is missing or does not match {CLASSIFIER_MANIFEST}"
                )
        self.class_names = tuple(self.manifest["class_names"])
        self.preprocess = ImagePreprocessor(self.manifest["preprocess"])
        self.encoder = make_session(self.folder / ENCODER_FILE, providers)
        self.head = make_session(self.folder / HEAD_FILE, providers)

    def features(self, images: ImageSet) -> np.ndarray:
        return encode_images(self.encoder, self.preprocess, images)

    def features_of_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return encode_pixels(self.encoder, pixels)

    def logits(self, features: np.ndarray) -> np.ndarray:
        (logits,) = self.head.run(["logits"], {"features": features.astype(np.float32)})
        return logits


def classification_options(command: Callable[..., None]) -> Callable[..., None]:
    """IMAGES, --data, --top-k and --json: what every command that classifies takes."""
    options = [
        click.argument("images", nargs=-1, type=click.Path(path_type=Path)),
        click.option(
            "--data",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            default=None,
            help="A labelled ImageFolder tree (root/class_name/*.png) instead of IMAGES: also "
            "prints the accuracy.",
        ),
        click.option(
            "--top-k",
            "k",
            type=click.IntRange(min=1),
            default=3,
            show_default=True,
            help="Classes shown per image.",
        ),
        click.option(
            "--json",
            "json_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="Also write every prediction (and the accuracy) here.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def subject_of(images: Sequence[Path], data: Path | None, class_names: Sequence[str]) -> ImageSet:
    """The images the user gave: loose files or a labelled folder, one of the two."""
    if bool(images) == (data is not None):
        raise click.UsageError("give image files or --data DIR (one of the two)")
    return labelled(data, class_names) if data else unlabelled(images, class_names)


def show_results(
    subject: ImageSet, logits: np.ndarray, scored: bool, k: int, json_path: Path | None, about: dict[str, Any]
) -> None:
    """Print each image's top-k (and the accuracy when `scored`), and write the JSON if asked."""
    found = predictions(subject, logits, k)
    accuracy = accuracy_of(subject, logits) if scored else None
    echo_predictions(found, accuracy, len(subject))
    if json_path is not None:
        json_path.write_text(json.dumps(report(found, accuracy, about), indent=2) + "\n")


@click.command("classify")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@classification_options
def classify(
    folder: Path, images: tuple[Path, ...], data: Path | None, k: int, json_path: Path | None
) -> None:
    """Classify IMAGES (or a labelled --data folder) with an exported classifier, torch-free."""
    classifier = ExportedClassifier(folder)
    subject = subject_of(images, data, classifier.class_names)
    logits = classifier.logits(classifier.features(subject))
    about = {key: classifier.manifest[key] for key in ("run_id", "round_id", "method")}
    show_results(subject, logits, data is not None, k, json_path, about)


if __name__ == "__main__":
    classify()
