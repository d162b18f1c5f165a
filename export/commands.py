"""The `fedprompt export` and `fedprompt verify` commands (registered in fedprompt/cli.py)."""

from __future__ import annotations

from pathlib import Path

import click

from edge_client.bundle import Bundle
from export.errors import ExportError
from export.exporter import DEFAULT_OPSET, export_bundle
from export.models import known_models
from export.onnx_graphs import MIN_OPSET
from export.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, generate_key_pair
from export.verify import summary, verify_bundle


def _list_models(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo("\n".join(known_models()))
        ctx.exit()


def _keygen(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    try:
        private, public = generate_key_pair(value)
    except ExportError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {private} (private: keep it secret, sign with --sign-key {private})")
    click.echo(f"wrote {public} (public: give it to devices and to fedprompt verify --trust-key {public})")
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
    help="Extra graphs besides fp32 (always written): fp16 (image, prompted image and text, float32 "
    "inputs and outputs) and/or int8 (dynamically quantised image encoder). Repeatable.",
)
@click.option(
    "--opset",
    default=DEFAULT_OPSET,
    show_default=True,
    type=click.IntRange(min=MIN_OPSET),
    help="ONNX opset of the graphs.",
)
@click.option(
    "--decoder",
    metavar="fedprompt-tiny-captioner|HUB_TAG|DIR",
    help="Add the captioning capability: a T5-family text decoder (the embedded tiny captioner, a "
    "Hugging Face folder, or a hub tag such as google/flan-t5-small, which needs a download), its "
    "tokenizer, its ONNX encoder and decoder-with-past graphs and a projection from the image "
    "features to its input (trained for the tiny captioner, seeded random otherwise). ViT models only.",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Ed25519 private key (PEM) to sign the bundle with: writes manifest.sig over manifest.json.",
)
@click.option(
    "--keygen",
    type=click.Path(path_type=Path, file_okay=False),
    expose_value=False,
    is_eager=True,
    callback=_keygen,
    metavar="DIR",
    help=f"Make an Ed25519 signing key pair in DIR ({PRIVATE_KEY_FILE}, mode 0600, and {PUBLIC_KEY_FILE}) "
    "and exit. Existing keys are never overwritten.",
)
@click.option(
    "--list-models",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_list_models,
    help="List the model names that can be given (open_clip's and fedprompt's configs) and exit.",
)
def export_command(
    model: str,
    pretrained: str,
    out: Path,
    precisions: tuple[str, ...],
    opset: int,
    decoder: str | None,
    sign_key: Path | None,
) -> None:
    """Export an open_clip MODEL into a bundle (format 2) for edge clients.

    The bundle holds the frozen image and text encoders as ONNX graphs, the text tower's tensors for
    back-propagation in torch, for ViT models the image tower's tensors and an image encoder that
    takes visual prompt tokens, the tokenizer's vocabulary, and manifest.json (capabilities, parts,
    preprocessing, tokenizer, sha256 of every file, parity against open_clip).
    Example: fedprompt export ViT-B-32 --pretrained none --out bundles/vit-b-32
    """
    try:
        path = export_bundle(model, pretrained, out, precisions, opset, sign_key=sign_key, decoder=decoder)
    except ExportError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {path}: {summary(Bundle.open(path, check_hashes=False).manifest)}")
    public = sign_key.with_suffix(".pub") if sign_key else None
    trust = "" if public is None else f" --trust-key {public if public.is_file() else 'PUBLIC_KEY.pem'}"
    click.echo(f"check it with: fedprompt verify {path}{trust}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--trust-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Ed25519 public key (PEM) the bundle must be signed by (manifest.sig). Repeatable: any one "
    "of them may have signed it.",
)
def verify_command(bundle: Path, trusted_keys: tuple[Path, ...]) -> None:
    """Check a BUNDLE: the sha256 of every file (and with --trust-key its signature); that the files
    on disk are exactly the listed ones; every manifest field against the open_clip model rebuilt
    from the manifest (preprocessing, logit scale, tokenizer, dimensions, tower specs, capabilities
    and parts); the tokenizer's ids against open_clip's; every graph in onnxruntime and the torch
    towers against that model on fresh random inputs (relative error = max|onnx - torch| /
    max|torch|, limits 1e-4 fp32, 1e-2 fp16, cosine >= 0.99 int8), with and without visual prompt
    tokens; that text cut after the last EOT gives the full-length features. Exit status 1 on failure."""
    if not verify_bundle(bundle, click.echo, trusted_keys):
        raise SystemExit(1)
