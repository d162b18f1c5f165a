"""Caption generation on the device in onnxruntime (no torch): the captioning encoder graph
(projection + T5 encoder, with soft prompts) and the decoder graph with self-attention past
keys/values, stepped by `edge_client.caption_search`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.providers import make_session

ENCODER_INPUTS = ("prompt_embeds", "image_features", "patch_tokens")
ENCODER_OUTPUT = "encoder_states"


def past_names(layers: int, kind: str = "past") -> list[str]:
    """past_key_0, past_value_0, ... (kind "present" for the outputs)."""
    return [f"{kind}_{what}_{i}" for i in range(layers) for what in ("key", "value")]


class OnnxStepper:
    """The stepper of `caption_search` on the bundle's caption_encoder.onnx and caption_decoder.onnx."""

    def __init__(
        self,
        encoder: Path,
        decoder: Path,
        spec: dict[str, Any],
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.encoder = make_session(encoder, providers, threads)
        self.decoder = make_session(decoder, providers, threads)
        self.layers = int(spec["num_decoder_layers"])
        self.heads, self.d_kv, self.d_model = int(spec["num_heads"]), int(spec["d_kv"]), int(spec["d_model"])
        self.names = past_names(self.layers)

    def encode(
        self, prompt: np.ndarray | None, image_features: np.ndarray, patch_tokens: np.ndarray
    ) -> np.ndarray:
        """[N, P+1+T, d] encoder states (prompt [N,P,d]; None = no prompt)."""
        n = len(image_features)
        if prompt is None:
            prompt = np.zeros((n, 0, self.d_model), dtype=np.float32)
        feed = dict(zip(ENCODER_INPUTS, (prompt, image_features, patch_tokens), strict=True))
        return self.encoder.run(None, {k: np.ascontiguousarray(v, np.float32) for k, v in feed.items()})[0]

    def start(self, prompt: np.ndarray | None, image_features: np.ndarray, patch_tokens: np.ndarray) -> Any:
        states = self.encode(prompt, image_features, patch_tokens)
        empty = np.zeros((len(states), self.heads, 0, self.d_kv), dtype=np.float32)
        return states, [empty] * (2 * self.layers)

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        states, past = state
        feed = {"input_ids": tokens.astype(np.int64)[:, None], ENCODER_OUTPUT: states}
        feed.update(zip(self.names, past, strict=True))
        logits, *present = self.decoder.run(None, feed)
        return logits[:, -1], (states, present)

    @staticmethod
    def select(state: Any, rows: np.ndarray) -> Any:
        states, past = state
        return states[rows], [p[rows] for p in past]
