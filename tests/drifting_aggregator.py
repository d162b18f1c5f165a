"""`fedprompt aggregator serve` turned against its devices: from round 2 on its tasks carry other
DP settings than round 1's (a compromised aggregator weakening local DP mid-run).

    python tests/drifting_aggregator.py --drift KEY=VALUE [--drift ...] --config FILE [serve options]

Each VALUE is JSON (e.g. `clip=0.4`, `dp="none"`). Round 1's tasks carry the config's settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, ClassVar

from aggregator import server as daemon
from aggregator.cli import aggregator
from aggregator.rounds import RoundCoordinator


class DriftingCoordinator(RoundCoordinator):
    """The daemon's coordinator whose task settings change after round 1."""

    drift: ClassVar[dict[str, Any]] = {}

    @property
    def client_settings_json(self) -> str:
        current = self._round
        if current is None or current.round_id < 2:
            return self._honest_settings_json
        honest = json.loads(self._honest_settings_json)
        return json.dumps({**honest, "core": {**honest["core"], **self.drift}}, sort_keys=True)

    @client_settings_json.setter
    def client_settings_json(self, value: str) -> None:
        self._honest_settings_json = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drift", action="append", default=[])
    known, serve_args = parser.parse_known_args()
    DriftingCoordinator.drift = {k: json.loads(v) for k, v in (item.split("=", 1) for item in known.drift)}
    daemon.RoundCoordinator = DriftingCoordinator
    aggregator(["serve", *serve_args])


if __name__ == "__main__":
    sys.exit(main())
