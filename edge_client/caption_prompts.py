"""The device's caption prompts, in numpy (generation needs no torch): `STATE/caption_prompt.npz`
holds either one shared soft prompt ("prompt" [P,d]) or AFSPL's fused prompt parts: "global" and
"local" [P,d], a gate on the image feature ("gate_weight" [3,D], "gate_bias" [3]) and the modality
prompt generator ("modality_weight" [P*d,D], "modality_bias" [P*d]). The fused prompt of an image
with feature f is w_g * global + w_l * local + w_m * modality(f), (w_g, w_l, w_m) = softmax(gate(f))."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPT_FILE = "caption_prompt.npz"
FUSED_KEYS = ("global", "local", "gate_weight", "gate_bias", "modality_weight", "modality_bias")


class PromptFileError(ValueError):
    """The prompt file is not one of the two layouts."""


def load_prompt_parts(state_dir: Path) -> dict[str, np.ndarray] | None:
    """The arrays of STATE/caption_prompt.npz, or None when the device has no prompt yet."""
    path = Path(state_dir) / PROMPT_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        parts = {k: np.asarray(data[k], np.float32) for k in data.files}
    if set(parts) != {"prompt"} and set(parts) != set(FUSED_KEYS):
        raise PromptFileError(f"{path} holds {sorted(parts)}; expected ['prompt'] or {sorted(FUSED_KEYS)}")
    return parts


def save_prompt_parts(state_dir: Path, parts: dict[str, np.ndarray]) -> Path:
    path = Path(state_dir) / PROMPT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in parts.items()})
    tmp.replace(path)
    return path


def prompts_for(parts: dict[str, np.ndarray] | None, image_features: np.ndarray) -> np.ndarray | None:
    """[N,P,d] prompts for images with features [N,D] (None without a prompt)."""
    if parts is None:
        return None
    n = len(image_features)
    if "prompt" in parts:
        return np.broadcast_to(parts["prompt"], (n, *parts["prompt"].shape)).astype(np.float32)
    shape = parts["global"].shape
    scores = image_features @ parts["gate_weight"].T + parts["gate_bias"]
    weights = np.exp(scores - scores.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    modality = (image_features @ parts["modality_weight"].T + parts["modality_bias"]).reshape(n, *shape)
    fused = (
        weights[:, 0, None, None] * parts["global"]
        + weights[:, 1, None, None] * parts["local"]
        + weights[:, 2, None, None] * modality
    )
    return fused.astype(np.float32)
