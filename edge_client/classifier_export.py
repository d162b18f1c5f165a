"""`fedprompt export-classifier`: freeze a device's classifier into a folder that onnxruntime runs
alone (`edge_client.exported_classifier`): no torch, no bundle, no state folder.

The head (the method's classifier with the class text features as constants) is exported with
torch.onnx and checked against torch on random features before anything is written as done; the
image encoder is the bundle's own graph, copied. `classifier.json` names what it came from: run,
round, method, bundle digest, classes, preprocessing, and the device's privacy spend (epsilon,
delta and accountant, from the device's accountant) so whoever deploys it knows what it cost.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnxruntime as ort
import torch

from edge_client.exported_classifier import CLASSIFIER_MANIFEST, ENCODER_FILE, HEAD_FILE
from edge_client.local_privacy import ACCOUNTANT_FILE
from edge_client.predict import DEVICE_ERRORS, DeviceClassifier, device_options
from fedprompt.common.privacy import PrivacyAccountant, PrivacyStateError

HEAD_OPSET = 17
HEAD_TOLERANCE = 1e-4  # max |logit| difference between onnxruntime and torch on the check batch


def privacy_spent(classifier: DeviceClassifier) -> dict[str, Any]:
    """The device's accountant report at the run's delta, or dp "none" when it never spent."""
    settings = classifier.run.settings
    path = classifier.state_dir / ACCOUNTANT_FILE
    if settings.get("dp", "none") == "none" or not path.exists():
        return {"dp": settings.get("dp", "none")}
    accountant = PrivacyAccountant.from_json(path.read_text())
    return {"dp": settings["dp"], **accountant.report(float(settings["delta"]))}


def export_checked(
    module: torch.nn.Module, example: torch.Tensor, names: tuple[str, str], path: Path
) -> float:
    """Write `module` (one input, one output, dynamic batch) as ONNX; returns the largest
    difference of its output to torch's on `example`."""
    source, target = names
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel has no ONNX symbolic
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[source],
        output_names=[target],
        dynamic_axes={source: {0: "batch"}, target: {0: "batch"}},
        opset_version=HEAD_OPSET,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run([target], {source: example.numpy()})
    with torch.no_grad():
        expected = module(example).numpy()
    return float(np.abs(exported - expected).max())


def export_head(classifier: DeviceClassifier, path: Path) -> float:
    """Write the head as ONNX (dynamic batch); returns the largest logit difference to torch."""
    features = torch.randn(8, classifier.bundle.embed_dim, generator=torch.Generator().manual_seed(0))
    features = features / features.norm(dim=1, keepdim=True)
    return export_checked(classifier.head, features, ("features", "logits"), path)


def write_encoder(classifier: DeviceClassifier, precision: str, path: Path) -> float:
    """The image encoder: the bundle's graph, copied (difference 0), or the method's own image
    side (`ClientMethod.image_encoder`) exported and checked against torch on random images."""
    if classifier.encoder is None:
        shutil.copyfile(classifier.bundle.encoder_path("image", precision), path)
        return 0.0
    size = classifier.bundle.manifest["image_size"]
    images = torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(1))
    return export_checked(classifier.encoder, images, ("images", "image_features"), path)


def export_classifier(
    classifier: DeviceClassifier, out: Path, precision: str | None = None
) -> dict[str, Any]:
    """Write the classifier folder `out` (created; must not hold a classifier yet); returns its manifest."""
    bundle, run = classifier.bundle, classifier.run
    precision = precision or bundle.manifest["default_precision"]
    bundle.encoder_path("image", precision)  # the bundle's own clear error if it lacks this precision
    out.mkdir(parents=True, exist_ok=True)
    if (out / CLASSIFIER_MANIFEST).exists():
        raise click.ClickException(f"{out} already holds a classifier; choose another folder")
    error = export_head(classifier, out / HEAD_FILE)
    if error > HEAD_TOLERANCE:
        raise click.ClickException(f"the exported head differs from torch by {error:.2e} > {HEAD_TOLERANCE}")
    encoder_error = write_encoder(classifier, precision, out / ENCODER_FILE)
    if encoder_error > HEAD_TOLERANCE:
        raise click.ClickException(
            f"the exported image encoder differs from torch by {encoder_error:.2e} > {HEAD_TOLERANCE}"
        )
    manifest = {
        "format": 1,
        "run_id": run.run_id,
        "round_id": run.round_id,
        "method": run.method,
        "bundle_digest": bundle.digest,
        "precision": precision,
        "class_names": list(run.class_names),
        "preprocess": bundle.preprocess,
        "privacy": privacy_spent(classifier),
        "head_max_abs_error": error,
        "encoder": "bundle" if classifier.encoder is None else f"{run.method} image side",
        "encoder_max_abs_error": encoder_error,
        "files": {
            name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in (ENCODER_FILE, HEAD_FILE)
        },
    }
    (out / CLASSIFIER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@click.command("export-classifier")
@device_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write the classifier into.",
)
@click.option("--precision", default=None, help="Image encoder precision (default: the bundle's).")
def export_classifier_command(bundle_dir: Path, state_dir: Path, out: Path, precision: str | None) -> None:
    """Write this device's classifier as ONNX graphs that run without torch: the image encoder,
    the head with the class text features baked in, and classifier.json (run, round, method,
    epsilon spent). Run it with `python -m edge_client.exported_classifier OUT IMAGES...`."""
    try:
        classifier = DeviceClassifier.load(bundle_dir, state_dir)
        manifest = export_classifier(classifier, out, precision)
    except (*DEVICE_ERRORS, PrivacyStateError) as error:
        raise click.ClickException(str(error).splitlines()[0]) from None
    size = sum((out / name).stat().st_size for name in manifest["files"])
    privacy = manifest["privacy"]
    spent = (
        f"epsilon {privacy['epsilon']:.2f} at delta {privacy['delta']:g}" if "epsilon" in privacy else "no DP"
    )
    click.echo(
        f"wrote {out}: {manifest['method']} run {manifest['run_id']} round {manifest['round_id']}, "
        f"{len(manifest['class_names'])} classes, {size / 1e6:.2f} MB, {spent}; head within "
        f"{manifest['head_max_abs_error']:.1e} of torch"
    )
