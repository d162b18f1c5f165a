"""`fedprompt caption --bundle B --state-dir S IMAGES...`: captions with the device's prompts,
generated in onnxruntime (this command imports no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_client.bundle import Bundle, BundleError
from edge_client.caption_data import cached_caption_features, caption_features, open_images
from edge_client.caption_prompts import PromptFileError, load_prompt_parts, prompts_for
from edge_client.caption_search import GREEDY, Decoding, generate

BATCH = 32


def caption_images(
    bundle: Bundle,
    state_dir: Path | None,
    images: list[Path],
    decoding: Decoding = GREEDY,
    threads: int | None = None,
) -> list[str]:
    """One caption per image with the prompts in `state_dir` (none: the frozen captioner alone)."""
    parts = load_prompt_parts(state_dir) if state_dir is not None else None
    stepper = bundle.caption_stepper(threads=threads)
    tokenizer = bundle.caption_tokenizer()
    spec = bundle.decoder_spec
    captions: list[str] = []
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        if state_dir is not None:  # the device's feature cache, as for training
            features, patches, _ = cached_caption_features(bundle, batch, state_dir / "features", threads)
        else:
            features, patches = caption_features(bundle, open_images(batch), threads)
        ids = generate(
            stepper,
            prompts_for(parts, features),
            features,
            patches,
            int(spec["decoder_start_token_id"]),
            int(spec["eos_token_id"]),
            decoding,
        )
        captions += tokenizer.decode_batch(ids)
    return captions


@click.command("caption")
@click.option(
    "--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Bundle with captioning."
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="The device's state folder (its caption_prompt.npz); without it, or without a prompt there, "
    "the frozen captioner runs without prompts.",
)
@click.option("--beams", type=click.IntRange(1, 16), default=1, show_default=True, help="1 = greedy.")
@click.option("--max-tokens", type=click.IntRange(1, 512), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1), help="onnxruntime threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {image, caption}.")
@click.argument(
    "images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
def caption_command(
    bundle_dir: Path,
    state_dir: Path | None,
    beams: int,
    max_tokens: int,
    threads: int | None,
    as_json: bool,
    images: tuple[Path, ...],
) -> None:
    """Write a caption for each of IMAGES with the device's soft prompts (onnxruntime, no torch)."""
    try:
        bundle = Bundle.open(bundle_dir)
        captions = caption_images(bundle, state_dir, list(images), Decoding(max_tokens, beams), threads)
    except (BundleError, PromptFileError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(
            json.dumps([{"image": str(p), "caption": c} for p, c in zip(images, captions, strict=True)])
        )
        return
    for path, text in zip(images, captions, strict=True):
        click.echo(f"{path}\t{text}")
