"""AFSPL's server half: each row of the global prompt moves by the example-weighted mean of the
row updates of the clients that sent that row (`aggregator.strategies.row_average`); rows nobody
sent stay. Updates are `{"rows": [K, d], "indices": [K]}` (deltas: measured from zero for
`max_update_norm`). The row numbers travel as floats (the wire codec carries floats); one that is
not a whole number inside the prompt, or sent twice, makes that client's upload ignored, counted in
the round's `uploads_ignored`. Robust rules do not apply to a per-row mean: the run is refused at
start unless [aggregation] is the plain mean without norm_bound."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from aggregator.config import ConfigError
from aggregator.strategies import register
from aggregator.strategies.base import ClientUpdate, ServerStrategy
from aggregator.strategies.combine import UpdateCombiner
from aggregator.strategies.row_average import average_rows
from aggregator.validation import ANY_COUNT, Interval
from fedprompt.common.methods import RunSettings


@register
class AFSPLStrategy(ServerStrategy):
    name = "afspl"
    extra_metrics: ClassVar[dict[str, Interval]] = {
        "caption_loss": ANY_COUNT,
        "received_caption_loss": ANY_COUNT,
    }

    def __init__(self, settings: RunSettings, combiner: UpdateCombiner | None = None) -> None:
        super().__init__(settings, combiner)
        if self.combiner.rule != "mean" or self.combiner.norm_bound:
            raise ConfigError(
                'method afspl averages each prompt row: set [aggregation] rule = "mean", no norm_bound'
            )

    def update_reference(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {}

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        current = state["global"]
        uploads, ignored = [], 0
        for update in updates:
            indices = row_numbers(update.tensors["indices"], len(current))
            if indices is None:
                ignored += 1
                continue
            uploads.append((indices, update.tensors["rows"], float(update.num_examples)))
        new, senders = average_rows(current, uploads)
        return {"global": new}, {
            "rows_moved": float((senders > 0).sum()),
            "uploads_ignored": float(ignored),
            "global_change_l2": float(np.linalg.norm(new - current)),
        }


def row_numbers(values: np.ndarray, rows: int) -> np.ndarray | None:
    """The row numbers as int64, or None unless they are distinct whole numbers in [0, rows)."""
    rounded = np.rint(values.astype(np.float64))
    if not np.all(np.isfinite(values)) or np.abs(rounded - values).max(initial=0) > 0.25:
        return None
    indices = rounded.astype(np.int64)
    if len(set(indices.tolist())) != len(indices) or (
        len(indices) and not 0 <= indices.min() <= indices.max() < rows
    ):
        return None
    return indices
