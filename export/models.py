"""Builds open_clip models for export: fedprompt's custom configs, weights from a tag, a local file or
none (seeded random weights, so that `verify` can rebuild exactly the same model)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch

from edge_client.bundle import sha256_file
from export.errors import UnsupportedModelError, WeightsUnavailableError
from export.quiet import quiet_root_logger

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
NO_WEIGHTS = "none"
DEFAULT_SEED = 0
NETWORK_PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from, as recorded in the manifest."""

    kind: str  # "none", "tag" or "path"
    value: str  # "none", the pretrained tag, or the weights file path
    sha256: str | None = None  # of the weights file, when a path

    def manifest_entry(self) -> str:
        return self.value if self.sha256 is None else f"{self.value} (sha256 {self.sha256})"


def register_custom_configs() -> None:
    """Make fedprompt's model configs (export/model_configs/*.json) known to open_clip."""
    open_clip.add_model_config(CONFIG_DIR)


def known_models() -> list[str]:
    register_custom_configs()
    return open_clip.list_models()


def parse_weights(pretrained: str) -> WeightsSource:
    """'none', an existing local file (.safetensors/.pt/.bin), or a pretrained tag."""
    if pretrained.lower() == NO_WEIGHTS:
        return WeightsSource("none", NO_WEIGHTS)
    path = Path(pretrained).expanduser()
    if path.is_file():
        return WeightsSource("path", str(path.resolve()), sha256_file(path))
    if any(sep in pretrained for sep in ("/", os.sep)) or path.suffix in (
        ".safetensors",
        ".pt",
        ".pth",
        ".bin",
    ):
        raise WeightsUnavailableError(f"weights file {pretrained} does not exist")
    return WeightsSource("tag", pretrained)


def build_model(model_name: str, weights: WeightsSource, seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """The open_clip model in eval mode, fp32, on CPU. Random weights are drawn after `seed`."""
    register_custom_configs()
    if model_name not in open_clip.list_models():
        raise UnsupportedModelError(
            f"unknown model {model_name!r}; `fedprompt export --list-models` shows the known ones, "
            f"or add a config to {CONFIG_DIR}"
        )
    pretrained = None if weights.kind == "none" else weights.value
    if weights.kind == "tag":
        pretrained = _local_file_for_tag(model_name, weights.value)
    torch.manual_seed(seed)
    try:
        with quiet_root_logger():
            model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu", precision="fp32")
    except (RuntimeError, ValueError, KeyError) as error:
        if weights.kind == "none":
            raise
        raise WeightsUnavailableError(
            f"cannot load weights {weights.value} into {model_name}: {_first_line(error)}"
        ) from error
    return model.eval()


def _local_file_for_tag(model_name: str, tag: str) -> str:
    """Download (or find in the local cache) the weights of a pretrained tag, failing fast offline."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise WeightsUnavailableError(
            f"unknown pretrained tag {tag!r} for {model_name} ({known}); or pass a local weights file path"
        )
    hint = f"pass a local weights file instead: --pretrained /path/to/{model_name}-{tag}.safetensors"
    cached = _cached_file(cfg)
    if cached:
        return cached
    host = _download_host(cfg)
    if not _reachable(host):
        raise WeightsUnavailableError(
            f"cannot download pretrained weights {tag!r} for {model_name} ({host} is "
            f"unreachable, offline?); {hint}"
        )
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as error:  # the hub and urllib raise many types; all mean "not available"
        raise WeightsUnavailableError(
            f"cannot download pretrained weights {tag!r} for {model_name}: {_first_line(error)}; {hint}"
        ) from error


def _cached_file(cfg: dict) -> str | None:
    """The weights file if an earlier download left it in the Hugging Face cache."""
    if not cfg.get("hf_hub"):
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, filename = os.path.split(cfg["hf_hub"])
    for name in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return found
    return None


def _download_host(cfg: dict) -> str:
    if cfg.get("hf_hub"):
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    return urlparse(cfg.get("url", "")).hostname or "unknown host"


def _reachable(host: str) -> bool:
    """One quick TCP connect instead of the hub client's minute of retries."""
    try:
        socket.create_connection((host, 443), timeout=NETWORK_PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
