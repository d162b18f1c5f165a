"""pFedMoAP's server-side pool: the latest prompt each client uploaded, and the choice of a
client's non-local experts as the pool prompts nearest (L2) to that client's own latest prompt.

A client with no prompt in the pool yet (its first round) gets no experts; with fewer other
entries than asked for it gets all of them. Ties in distance go to the smaller client id, so the
choice is deterministic. The pool round-trips through JSON (the strategy state) as base64 of the
wire codec's fp32 encoding: exact, and far smaller than lists of floats.
"""

from __future__ import annotations

import base64

import numpy as np

from fedprompt.common.codec import decode_tensor_set, encode_tensor_set


class PromptPool:
    def __init__(self, prompts: dict[str, np.ndarray] | None = None) -> None:
        self.prompts: dict[str, np.ndarray] = dict(prompts or {})

    def __len__(self) -> int:
        return len(self.prompts)

    def put(self, client_id: str, prompt: np.ndarray) -> None:
        self.prompts[client_id] = np.asarray(prompt, np.float32).copy()

    def nearest(self, client_id: str, count: int) -> list[str]:
        """Up to `count` other clients whose prompts are nearest to this client's, nearest first."""
        own = self.prompts.get(client_id)
        if own is None or count < 1:
            return []
        distances = sorted(
            (float(np.linalg.norm(prompt.astype(np.float64) - own)), other)
            for other, prompt in self.prompts.items()
            if other != client_id
        )
        return [other for _, other in distances[:count]]

    def experts_for(self, client_id: str, count: int) -> np.ndarray | None:
        """[E, *prompt shape] stacked nearest prompts, or None when there are none."""
        chosen = self.nearest(client_id, count)
        return np.stack([self.prompts[other] for other in chosen]) if chosen else None

    def to_json(self) -> str:
        return base64.b64encode(encode_tensor_set(self.prompts, "fp32")).decode("ascii")

    @classmethod
    def from_json(cls, text: str) -> PromptPool:
        return cls(decode_tensor_set(base64.b64decode(text)))
