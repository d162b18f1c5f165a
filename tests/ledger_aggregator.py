"""`fedprompt aggregator serve` whose PromptFL server half also keeps a ledger in its strategy
state: the sorted client ids of every aggregation it has made. The ledger is committed with each
round like any method's pools or accountants, so after crashes it must equal the committed
rounds' client lists: a round applied twice, or a state not committed with its round, shows.

    python tests/ledger_aggregator.py --config FILE [--aggregate-s S] [--fail-aggregations N] [serve options]

`--aggregate-s` makes each aggregation take S seconds, so a test can kill -9 the daemon during it.
`--fail-aggregations N` makes the first N aggregations raise after writing their ledger entry, as
a server half with a bug would: the round must be played again, with nothing of the failed
attempt left in the committed state.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from aggregator.cli import aggregator
from aggregator.strategies import SERVER_STRATEGIES
from aggregator.strategies.base import ClientUpdate
from aggregator.strategies.promptfl import PromptFLStrategy


class LedgerPromptFL(PromptFLStrategy):
    """PromptFL plus a ledger of its aggregations in `state_dict`."""

    aggregate_s = 0.0
    failures_left = 0

    def __init__(self, settings: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.ledger: list[list[str]] = []

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        time.sleep(self.aggregate_s)
        self.ledger.append(sorted(update.client_id for update in updates))
        if LedgerPromptFL.failures_left > 0:
            LedgerPromptFL.failures_left -= 1
            raise ArithmeticError("injected aggregation failure")
        return super().aggregate(state, updates)

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger = [list(clients) for clients in state["ledger"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aggregate-s", type=float, default=0.0)
    parser.add_argument("--fail-aggregations", type=int, default=0)
    known, serve_args = parser.parse_known_args()
    LedgerPromptFL.aggregate_s = known.aggregate_s
    LedgerPromptFL.failures_left = known.fail_aggregations
    SERVER_STRATEGIES["promptfl"] = LedgerPromptFL
    aggregator(["serve", *serve_args])


if __name__ == "__main__":
    sys.exit(main())
