"""Which bundle an experiment runs on: a folder from `fedprompt export`, or "embedded", the tiny
CLIP whose weights are committed in `export/weights`, exported once into the experiment's cache
(keyed by the weights' sha256, so new weights give a new bundle)."""

from __future__ import annotations

from pathlib import Path

from edge_client.bundle import Bundle, sha256_file
from export.exporter import export_bundle
from fedprompt.harness.experiment_config import EMBEDDED, BundleConfig

EMBEDDED_MODEL = "fedprompt-tiny"
EMBEDDED_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "export" / "weights" / f"{EMBEDDED_MODEL}.safetensors"
)


def resolve_bundle(bundle: BundleConfig, base_dir: Path, cache_dir: Path) -> Path:
    """The bundle folder to open (a relative path is read from the config's folder)."""
    if bundle.path != EMBEDDED:
        return (base_dir / bundle.path).resolve()
    if not EMBEDDED_WEIGHTS.is_file():
        raise FileNotFoundError(f"no committed tiny CLIP weights at {EMBEDDED_WEIGHTS}; give [bundle] path")
    out = cache_dir / "bundles" / f"{EMBEDDED_MODEL}-{sha256_file(EMBEDDED_WEIGHTS)[:12]}"
    if not (out / "manifest.json").is_file():
        export_bundle(EMBEDDED_MODEL, str(EMBEDDED_WEIGHTS), out, progress=False)
    Bundle.open(out)  # a damaged cached bundle is one clear error, not a wrong result
    return out
