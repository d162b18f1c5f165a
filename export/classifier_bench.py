"""`fedprompt bench classifier DIR`: what an exported classifier costs on this device, per image:
the image encoder, the head, and both together, at batch 1 and a larger batch, all timed in one
process (so the head's share of the total is measured on the same machine state), plus its size
on disk.

Images are seeded random RGB pictures at the encoder's input size: speed does not depend on
content, and no data set is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image

from edge_client.exported_classifier import ENCODER_FILE, HEAD_FILE, ExportedClassifier
from export.bench import latency_row, time_runs


def random_pixels(classifier: ExportedClassifier, batch: int, seed: int = 0) -> np.ndarray:
    """A preprocessed batch of random images, as the encoder receives it."""
    rng = np.random.default_rng(seed)
    size = int(classifier.manifest["preprocess"]["resize"])
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
    return np.stack([classifier.preprocess(image) for image in images])


def batch_rows(classifier: ExportedClassifier, batch: int) -> list[dict[str, Any]]:
    """Encoder, head and total at one batch size."""
    pixels = random_pixels(classifier, batch)
    features = classifier.features_of_pixels(pixels)

    def encoder() -> None:
        classifier.features_of_pixels(pixels)

    def head() -> None:
        classifier.logits(features)

    def total() -> None:
        classifier.logits(classifier.features_of_pixels(pixels))

    rows = []
    for part, run in (("encoder", encoder), ("head", head), ("total", total)):
        row = latency_row("onnxruntime", classifier.encoder.get_providers()[0], "", batch, time_runs(run))
        rows.append({**row, "part": part, "ms_per_image": row["p50_ms"] / batch})
    return rows


@click.command("classifier")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--batch",
    "batches",
    type=click.IntRange(min=1),
    multiple=True,
    default=(1, 16),
    show_default=True,
    help="Batch sizes to time (repeatable).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the figures here.",
)
def bench_classifier(folder: Path, batches: tuple[int, ...], json_path: Path | None) -> None:
    """Latency per image of an exported classifier (`fedprompt export-classifier`): image encoder,
    head and total, per batch size, with the head's share, and the classifier's size on disk."""
    classifier = ExportedClassifier(folder)
    sizes = {name: (folder / name).stat().st_size for name in (ENCODER_FILE, HEAD_FILE)}
    rows = [row for batch in batches for row in batch_rows(classifier, batch)]
    click.echo(
        f"{folder}: {classifier.manifest['method']}, {len(classifier.class_names)} classes, "
        f"{sum(sizes.values()) / 1e6:.2f} MB on disk (encoder {sizes[ENCODER_FILE] / 1e6:.2f} MB, "
        f"head {sizes[HEAD_FILE] / 1e3:.1f} KB), provider {rows[0]['provider']}"
    )
    click.echo(f"{'batch':>5}  {'part':<8} {'us/image':>10} {'images/s':>11}")
    for row in rows:
        micros = 1e3 * row["ms_per_image"]
        click.echo(f"{row['batch']:>5}  {row['part']:<8} {micros:>10.1f} {row['images_per_s']:>11.0f}")
    for batch in batches:
        of = {r["part"]: r["ms_per_image"] for r in rows if r["batch"] == batch}
        click.echo(f"batch {batch}: the head is {100 * of['head'] / of['total']:.2f}% of the total per image")
    if json_path is not None:
        json_path.write_text(json.dumps({"sizes_bytes": sizes, "rows": rows}, indent=2) + "\n")
