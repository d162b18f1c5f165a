"""Greedy and beam-search decoding over any stepper (onnxruntime or torch), in numpy only.

A stepper has `start(prompt, image_features, patch_tokens) -> state` (one row per image),
`step(tokens [B] int64, state) -> (logits [B,V], state)` and `select(state, rows) -> state`. One
search serves both engines, so the ONNX decoder and torch are compared on the same algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class Stepper(Protocol):
    def start(
        self, prompt: np.ndarray | None, image_features: np.ndarray, patch_tokens: np.ndarray
    ) -> Any: ...

    def step(self, tokens: np.ndarray, state: Any) -> tuple[np.ndarray, Any]: ...

    def select(self, state: Any, rows: np.ndarray) -> Any: ...


@dataclass(frozen=True)
class Decoding:
    """How to decode: greedy when beams == 1; beam scores are log-probability / length**length_penalty."""

    max_tokens: int = 24
    beams: int = 1
    length_penalty: float = 1.0


GREEDY = Decoding()


def generate(
    stepper: Stepper,
    prompt: np.ndarray | None,
    image_features: np.ndarray,
    patch_tokens: np.ndarray,
    start_id: int,
    eos_id: int,
    decoding: Decoding = GREEDY,
) -> list[list[int]]:
    """Token ids of one caption per image (EOS not included)."""
    state = stepper.start(prompt, image_features, patch_tokens)
    if decoding.beams == 1:
        return _greedy(stepper, state, len(image_features), start_id, eos_id, decoding.max_tokens)
    return [
        _beam(stepper, stepper.select(state, np.full(decoding.beams, i)), start_id, eos_id, decoding)
        for i in range(len(image_features))
    ]


def _greedy(
    stepper: Stepper, state: Any, batch: int, start_id: int, eos_id: int, max_tokens: int
) -> list[list[int]]:
    tokens = np.full(batch, start_id, dtype=np.int64)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    for _ in range(max_tokens):
        logits, state = stepper.step(tokens, state)
        tokens = logits.argmax(-1).astype(np.int64)
        for row in np.flatnonzero(~done):
            if tokens[row] != eos_id:
                out[row].append(int(tokens[row]))
        done |= tokens == eos_id
        if done.all():
            break
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _beam(stepper: Stepper, state: Any, start_id: int, eos_id: int, decoding: Decoding) -> list[int]:
    """Beam search for one image; `state` holds `beams` copies of its row. Stops when `beams`
    hypotheses have ended and no live one can still beat the worst of them."""
    beams, penalty = decoding.beams, decoding.length_penalty
    sequences: list[list[int]] = [[]]
    scores = np.zeros(1)
    state = stepper.select(state, np.zeros(1, dtype=np.int64))
    tokens = np.array([start_id], dtype=np.int64)
    finished: list[tuple[float, list[int]]] = []
    for length in range(1, decoding.max_tokens + 1):
        logits, state = stepper.step(tokens, state)
        candidates = scores[:, None] + _log_softmax(logits)
        vocab = candidates.shape[1]
        order = np.argsort(-candidates, axis=None, kind="stable")[: 2 * beams]
        rows, keep, kept_scores = [], [], []
        for flat in order:
            row, token = divmod(int(flat), vocab)
            if token == eos_id:
                finished.append((float(candidates[row, token]) / length**penalty, sequences[row]))
            else:
                rows.append(row)
                keep.append(token)
                kept_scores.append(float(candidates[row, token]))
            if len(rows) == beams:
                break
        finished.sort(key=lambda item: -item[0])
        finished = finished[:beams]
        if len(finished) == beams and kept_scores[0] / length**penalty < finished[-1][0]:
            break
        sequences = [[*sequences[r], t] for r, t in zip(rows, keep, strict=True)]
        scores = np.asarray(kept_scores)
        state = stepper.select(state, np.asarray(rows, dtype=np.int64))
        tokens = np.asarray(keep, dtype=np.int64)
    else:
        finished += [(s / decoding.max_tokens**penalty, q) for s, q in zip(scores, sequences, strict=True)]
    return max(finished, key=lambda item: item[0])[1]
