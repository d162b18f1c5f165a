"""What the daemon tells operators, as Prometheus metrics (`prometheus_client`).

One `AggregatorMetrics` per daemon, on its own registry (several daemons in one process, as in
tests, do not share counters). The gRPC layer counts wire bytes and refusals per RPC where every
call passes (`aggregator.server`), the coordinator reports every committed round, and gauges that
mirror the coordinator's state are read when scraped, so nothing is counted twice. Served over
plain HTTP at `server.metrics_address` (`/metrics`); no series carries a client id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("fedprompt.aggregator")
ROUND_SECONDS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class AggregatorMetrics:
    """The daemon's series. `watch` binds the gauges read from the coordinator at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_committed = Gauge(
            "fedprompt_rounds_committed", "Rounds of the run committed so far (survives restarts)", registry=r
        )
        self.round_open = Gauge(
            "fedprompt_round_open", "The open round's id, 0 when none is open", registry=r
        )
        self.clients_live = Gauge(
            "fedprompt_clients_live", "Clients heard from within rounds.client_timeout_s", registry=r
        )
        self.round_clients = Gauge(
            "fedprompt_round_clients", "Clients aggregated in the last committed round", registry=r
        )
        self.round_duration = Histogram(
            "fedprompt_round_duration_seconds",
            "From a round's opening to its commit",
            buckets=ROUND_SECONDS,
            registry=r,
        )
        self.updates_accepted = Counter(
            "fedprompt_updates_accepted",
            "Updates accepted by PushUpdate (stored before the reply)",
            registry=r,
        )
        self.refused = Counter(
            "fedprompt_refused",
            "Calls refused, by RPC and reason (the gRPC status code); PushUpdate's are refused updates",
            ["rpc", "reason"],
            registry=r,
        )
        self.bytes_in = Counter(
            "fedprompt_received_bytes", "Request message bytes received, by RPC", ["rpc"], registry=r
        )
        self.bytes_out = Counter(
            "fedprompt_sent_bytes", "Reply message bytes sent, by RPC", ["rpc"], registry=r
        )
        self.epsilon = Gauge(
            "fedprompt_epsilon_spent",
            "Privacy spent by the run at the last commit: 'device' = the largest epsilon the devices' "
            "accountants reported (local DP), 'global' = the server's central-DP accountant",
            ["run_id", "kind"],
            registry=r,
        )

    def watch(
        self, committed: Callable[[], int], open_round: Callable[[], int], live: Callable[[], int]
    ) -> None:
        self.rounds_committed.set_function(committed)
        self.round_open.set_function(open_round)
        self.clients_live.set_function(live)

    def round_committed(self, run_id: str, metrics: dict[str, Any]) -> None:
        """A round was just committed with these round metrics."""
        self.round_duration.observe(metrics["duration_s"])
        self.restored(run_id, metrics)

    def restored(self, run_id: str, metrics: dict[str, Any]) -> None:
        """The gauges of the last committed round (at start: the latest stored one). Devices'
        accountants are cumulative, so its largest epsilon report is what the run has spent."""
        self.round_clients.set(len(metrics.get("clients", ())))
        if metrics.get("epsilon_max") is not None:
            self.epsilon.labels(run_id, "device").set(metrics["epsilon_max"])
        global_epsilon = metrics.get("strategy", {}).get("global_epsilon")
        if global_epsilon is not None:
            self.epsilon.labels(run_id, "global").set(global_epsilon)

    def serve(self, address: str) -> tuple[Any, int]:
        """Serve `/metrics` on `address` (HOST:PORT, port 0 = any free) from a daemon thread;
        returns the HTTP server (`shutdown()` stops it) and its bound port."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), host.strip("[]"), registry=self.registry)
        return server, server.server_address[1]
