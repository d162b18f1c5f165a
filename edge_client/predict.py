"""`fedprompt predict`: classify images on the device with what it holds after a run.

The classifier is the method's own head (`ClientMethod.head`) built from the model the aggregator
served this device at the end of the run and what the method keeps on the device (DP-FPL's local
prompt, pFedMoAP's gating network, SecFPP's class-level prompts), exactly what the harness scores.
The class text features are computed once when the head is built, so a prediction is one ONNX
image-encoder pass (features cached by content, as in training) plus the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from edge_client.bundle import Bundle, BundleError
from edge_client.class_heads import encoded_features
from edge_client.datasets import DatasetError, ImageSet
from edge_client.device_run import DeviceRun, DeviceRunError, load_device_run
from edge_client.exported_classifier import classification_options, show_results, subject_of
from edge_client.features import image_features
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.workspace import FEATURES_DIR, ClientWorkspace, LabelledFeatures, WorkspaceError


@dataclass
class DeviceClassifier:
    """A device's bundle, finished run and the head its method builds from them."""

    bundle: Bundle
    run: DeviceRun
    head: nn.Module
    state_dir: Path
    encoder: nn.Module | None = None  # the method's own image side, else the bundle's encoder

    @classmethod
    def load(cls, bundle_dir: str | Path, state_dir: str | Path) -> DeviceClassifier:
        bundle = Bundle.open(bundle_dir)
        run = load_device_run(state_dir)
        if run.bundle_digest != bundle.digest:
            raise DeviceRunError(
                f"{state_dir} was trained with bundle {run.bundle_digest[:12]}, not {bundle_dir} "
                f"({bundle.digest[:12]}): give the bundle the device trained with"
            )
        if run.method not in CLIENT_METHODS:
            raise DeviceRunError(f"run {run.run_id} used method {run.method!r}, unknown to this client")
        empty = LabelledFeatures(torch.zeros(0, bundle.embed_dim), torch.zeros(0, dtype=torch.int64))
        workspace = ClientWorkspace(
            bundle, bundle.text_tower(), run.class_names, empty, empty, Path(state_dir)
        )
        method, task = CLIENT_METHODS[run.method](workspace), run.next_task()
        encoder = method.image_encoder(task)
        head = method.head(task).eval()
        return cls(bundle, run, head, Path(state_dir), None if encoder is None else encoder.eval())

    def features(self, images: ImageSet, precision: str | None = None) -> np.ndarray:
        """Normalised image features [N, D]: through the device's feature cache, or the method's
        own image side (computed in torch here, exported with the classifier)."""
        if self.encoder is not None:
            return encoded_features(self.encoder, images, self.bundle).numpy()
        raw, _ = image_features(images, self.bundle, self.state_dir / FEATURES_DIR, precision, progress=False)
        return raw / np.linalg.norm(raw, axis=1, keepdims=True)

    @torch.no_grad()
    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.head(torch.from_numpy(features.astype(np.float32))).numpy()


def device_options(command: Callable[..., None]) -> Callable[..., None]:
    """--bundle and --state-dir: the device whose finished run a command classifies with."""
    command = click.option(
        "--state-dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        required=True,
        help="The device's state folder after `fedprompt client run` finished a run.",
    )(command)
    return click.option(
        "--bundle",
        "bundle_dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        required=True,
        help="The bundle the device trained with.",
    )(command)


DEVICE_ERRORS = (BundleError, DatasetError, DeviceRunError, WorkspaceError, OSError)


@click.command("predict")
@device_options
@classification_options
@click.option("--precision", default=None, help="Image encoder precision (default: the bundle's).")
def predict_command(
    bundle_dir: Path,
    state_dir: Path,
    images: tuple[Path, ...],
    data: Path | None,
    k: int,
    json_path: Path | None,
    precision: str | None,
) -> None:
    """Classify IMAGES (or a labelled --data folder) with the model this device holds after a run:
    the global prompt for PromptFL, the personalised model for DP-FPL, pFedMoAP, SecFPP and
    FedMVP."""
    try:
        classifier = DeviceClassifier.load(bundle_dir, state_dir)
        subject = subject_of(images, data, classifier.run.class_names)
        logits = classifier.logits(classifier.features(subject, precision))
    except DEVICE_ERRORS as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    run = classifier.run
    click.echo(f"run {run.run_id}, {run.method}, model of round {run.round_id}")
    about = {"run_id": run.run_id, "round_id": run.round_id, "method": run.method}
    show_results(subject, logits, data is not None, k, json_path, about)
