"""The `fedprompt export` and `fedprompt verify` commands (registered in fedprompt/cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from edge_client.bundle import Bundle
from export.errors import ExportError
from export.exporter import DEFAULT_OPSET, export_bundle
from export.models import known_models
from export.onnx_graphs import MIN_OPSET
from export.verify import summary, verify_bundle


def _list_models(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo("\n".join(known_models()))
        ctx.exit()


@click.command("export")
@click.argument("model")
@click.option(
    "--pretrained",
    required=True,
    metavar="TAG|PATH|none",
    help="Weights: an open_clip pretrained tag (needs a download), a local .safetensors/.pt file, "
    "or 'none' for seeded random weights (tests, benchmarks).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    default=("fp32",),
    show_default=True,
    type=click.Choice(["fp32", "fp16", "int8"]),
    help="Extra graphs besides fp32 (always written): fp16 (image and text, float32 inputs and "
    "outputs) and/or int8 (dynamically quantised image encoder). Repeatable.",
)
@click.option(
    "--opset",
    default=DEFAULT_OPSET,
    show_default=True,
    type=click.IntRange(min=MIN_OPSET),
    help="ONNX opset of the graphs.",
)
@click.option(
    "--list-models",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_models,
    help="List the model names that can be given (open_clip's and fedprompt's configs) and exit.",
)
def export_command(model: str, pretrained: str, out: Path, precisions: tuple[str, ...], opset: int) -> None:
    """Export an open_clip MODEL into an ONNX bundle for edge clients.

    The bundle holds the frozen image and text encoders as ONNX graphs, the text tower's tensors for
    back-propagation in torch, and manifest.json (preprocessing, tokenizer, sha256 of every file,
    parity against open_clip). Example: fedprompt export ViT-B-32 --pretrained none --out bundles/vit-b-32
    """
    try:
        path = export_bundle(model, pretrained, out, precisions, opset)
    except ExportError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {path}: {summary(Bundle.open(path, check_hashes=False).manifest)}")
    click.echo(f"check it with: fedprompt verify {path}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
def verify_command(bundle: Path) -> None:
    """Check a BUNDLE: sha256 of every file, the manifest, both graphs in onnxruntime against the
    open_clip model rebuilt from the manifest (fresh random inputs; relative error = max|onnx - torch| /
    max|torch|, limits 1e-4 fp32, 1e-2 fp16, cosine >= 0.99 int8), the torch text tower, and that text
    sequences cut after the last EOT give the same features as full-length ones. Exit status 1 on failure."""
    if not verify_bundle(bundle, click.echo):
        raise SystemExit(1)
