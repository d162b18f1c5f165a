"""`fedprompt verify BUNDLE`: hashes, manifest, and the graphs against the open_clip model rebuilt
from the manifest, on fresh random inputs. Prints one line per check."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from edge_client.bundle import TEXT_TOWER_FILE, Bundle, BundleError, encoder_file, sha256_file
from export.errors import ExportError
from export.models import WeightsSource, build_model
from export.parity import CUT_MAX_REL, Agreement, limit_text, measure_parity
from export.towers import text_parts

REQUIRED_KEYS = (
    "model",
    "weights_source",
    "seed",
    "embed_dim",
    "context_length",
    "vocab_size",
    "image_size",
    "preprocess",
    "tokenizer",
    "logit_scale",
    "text_tower",
    "opset",
    "precisions",
    "files",
)


def verify_bundle(path: Path, echo: Callable[[str], None] = print) -> bool:
    """Run every check, print a line for each, return True when all pass."""
    try:
        bundle = Bundle.open(path)
        echo(f"{'hashes':<14}ok, {len(bundle.manifest['files'])} files match manifest.json")
        _check_manifest(bundle)
        model = rebuild_model(bundle)
    except (BundleError, ExportError) as error:
        echo(f"FAILED: {error}")
        return False
    manifest = bundle.manifest
    echo(
        f"{'model':<14}{manifest['model']} rebuilt from weights {manifest['weights']} "
        f"(seed {manifest['seed']}); text tower tensors identical to the bundle's"
    )
    parity = measure_parity(model, bundle)
    ok = True
    for tower in ("image", "text"):
        for precision, numbers in parity[tower].items():
            ok &= _report(echo, f"{tower} {precision}", Agreement(**numbers), precision)
    ok &= _report(echo, "text torch", Agreement(**parity["text_tower"]), "fp32")
    cut = parity["cut_context"]
    if "length" in cut:
        passed = cut["exact"]
        echo(
            f"{'cut context':<14}L={cut['length']} vs {cut['full_length']}: max_abs {cut['max_abs']:.2e}  "
            f"max_rel {cut['max_rel']:.2e}  {'ok' if passed else 'FAILED'} (rel <= {CUT_MAX_REL:g})"
        )
        ok &= passed
    else:
        echo(f"{'cut context':<14}not exact: {cut['reason']}")
    echo("verify: all checks passed" if ok else "verify: FAILED")
    return ok


def _report(echo: Callable[[str], None], label: str, agreement: Agreement, precision: str) -> bool:
    passed = agreement.passes(precision)
    echo(
        f"{label:<14}max_abs {agreement.max_abs:.2e}  max_rel {agreement.max_rel:.2e}  "
        f"min_cos {agreement.min_cosine:.6f}  {'ok' if passed else 'FAILED'} ({limit_text(precision)})"
    )
    return passed


def _check_manifest(bundle: Bundle) -> None:
    manifest = bundle.manifest
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"manifest.json lacks {', '.join(missing)}")
    needed = [TEXT_TOWER_FILE, encoder_file("text", "fp32")]
    needed += [encoder_file("image", p) for p in manifest["precisions"]]
    unlisted = [name for name in needed if name not in manifest["files"]]
    if unlisted:
        raise BundleError(f"manifest.json does not list {', '.join(unlisted)}")


def rebuild_model(bundle: Bundle) -> torch.nn.Module:
    """The open_clip model the bundle was exported from; its text tower must equal the bundle's."""
    source = WeightsSource(**bundle.manifest["weights_source"])
    if source.kind == "path":
        weights_file = Path(source.value)
        if not weights_file.is_file():
            raise ExportError(
                f"weights file {weights_file} (named in the manifest) is missing; verify needs it"
            )
        if sha256_file(weights_file) != source.sha256:
            raise ExportError(f"weights file {weights_file} changed since export (sha256 differs)")
    model = build_model(bundle.manifest["model"], source, bundle.manifest["seed"])
    rebuilt = text_parts(model).state_dict()
    stored = load_file(str(bundle.path / TEXT_TOWER_FILE))
    if rebuilt.keys() != stored.keys() or any(not torch.equal(rebuilt[k], stored[k]) for k in stored):
        raise ExportError(
            "the rebuilt model's text tower differs from text_tower.safetensors "
            "(different weights, or random weights drawn by another torch version)"
        )
    return model


def summary(manifest: dict[str, Any]) -> str:
    """One line that names a bundle."""
    return (
        f"{manifest['model']} (weights {manifest['weights']}, opset {manifest['opset']}, "
        f"precisions {', '.join(manifest['precisions'])})"
    )
