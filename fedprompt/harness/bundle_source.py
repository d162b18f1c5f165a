"""Which bundle an experiment runs on: a folder from `fedprompt export`, or "embedded", the tiny
CLIP whose weights are committed in `export/weights` (checked against their provenance, as the
demo does), exported once into the experiment's cache under the weights' sha256, so new weights
give a new bundle."""

from __future__ import annotations

import json
from pathlib import Path

from edge_client.bundle import FORMAT_VERSION, MANIFEST, Bundle, sha256_file
from export.exporter import DEFAULT_OPSET, export_bundle
from export.pretrain import TINY_MODEL
from fedprompt.harness.demo import committed_weights
from fedprompt.harness.experiment_config import EMBEDDED, BundleConfig


def resolve_bundle(bundle: BundleConfig, base_dir: Path, cache_dir: Path) -> Path:
    """The bundle folder to open (a relative path is read from the config's folder)."""
    if bundle.path != EMBEDDED:
        return (base_dir / bundle.path).resolve()
    weights = committed_weights()
    out = cache_dir / "bundles" / f"{TINY_MODEL}-{sha256_file(weights)[:12]}"
    if not _is_current_format(out / MANIFEST):
        export_bundle(TINY_MODEL, str(weights), out, ("fp32",), DEFAULT_OPSET, progress=False)
    Bundle.open(out)  # a damaged cached bundle is one clear error, not a wrong result
    return out


def _is_current_format(manifest: Path) -> bool:
    """A cached bundle of an older format is exported again (with the same weights)."""
    try:
        return json.loads(manifest.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False
