"""Load test on loopback: N light clients (the real client runtime sending prepared updates, see
light_clients.py) in P processes through R rounds of a real `fedprompt aggregator serve`.

Mid-run it kills the aggregator with SIGKILL during round `restart_round` (about half of the
round's updates in) and restarts it on the same port, and in the last round it SIGKILLs a share of
the client processes while their clients train. Then it prints per-round latency (round sampled to
round committed, as the harness saw the log lines) and updates/s, and checks the committed state:
every update a client was told was accepted is in its round, and every round's global model is the
exact FedAvg of that round's updates (so none was lost or applied twice).

    python tests/loadtest.py --clients 200 --rounds 5 [--processes 10] [--kill-fraction 0.3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from aggregator_process import AggregatorProcess, LightClients, free_port, write_config
from light_clients import expected_global

from aggregator.store import SQLiteStore
from fedprompt.common.bundle_dims import BundleDims

ACCEPTED = r"client-(\d+) round (\d+): update accepted"


@dataclass
class RoundFigures:
    round_id: int
    updates: int
    latency_s: float  # "sampled" -> "committed" log lines, across a restart if there was one
    updates_per_s: float  # updates / latency
    upload_burst_updates_per_s: float  # updates / (last accepted - first accepted), as clients heard


@dataclass
class LoadReport:
    clients: int
    processes: int
    min_updates: int
    killed_clients: int = 0
    aggregator_restarts: int = 0
    rounds: list[RoundFigures] = field(default_factory=list)
    accepted_updates: int = 0
    lost_updates: int = 0
    wrong_aggregates: int = 0
    rounds_below_min_updates: int = 0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost_updates or self.wrong_aggregates or self.rounds_below_min_updates)


class LoadRun:
    """One load test in `workdir`: the aggregator, the client processes and the checks."""

    def __init__(
        self,
        workdir: Path,
        clients: int,
        rounds: int,
        processes: int,
        kill_fraction: float,
        train_s: float,
        bundle: Path,
        poll_s: float,
    ) -> None:
        if clients % processes or rounds < 2:
            raise SystemExit("--clients must be a multiple of --processes, and --rounds at least 2")
        self.shape = (16, BundleDims.read(bundle).text_width)  # the default n_ctx on the run's bundle
        self.workdir, self.total_rounds, self.train_s, self.bundle = workdir, rounds, train_s, bundle
        self.processes, self.per_process = processes, clients // processes
        self.victims = round(kill_fraction * processes)
        self.report = LoadReport(clients, processes, min_updates=math.ceil(clients / 2))
        self.config = write_config(
            workdir / "aggregator.toml",
            {
                "rounds": rounds,
                "min_clients": clients,
                "min_fit": clients,
                "min_updates": self.report.min_updates,
                "round_timeout_s": 300.0,
                "poll_interval_s": poll_s,
                "heartbeat_interval_s": 1.0,
                "client_timeout_s": 4.0,
            },
            {"port": free_port(), "update_encoding": "fp16", "workers": 32},
            bundle=bundle,
        )
        store = SQLiteStore(workdir / "state.sqlite")
        tokens = [store.issue_token(f"light {i}") for i in range(clients)]
        store.close()
        (workdir / "tokens.txt").write_text("\n".join(tokens) + "\n")
        self.servers: list[AggregatorProcess] = []
        self.client_processes: list[LightClients] = []

    def play(self) -> LoadReport:
        started = time.monotonic()
        self.servers.append(AggregatorProcess(self.config))
        extra = ["--train-s", str(self.train_s), "--shape", *map(str, self.shape), "--patience", "300"]
        self.client_processes = [
            LightClients(
                self.servers[0].address,
                self.workdir / "tokens.txt",
                self.workdir / "clients",
                p * self.per_process,
                self.per_process,
                *extra,
                bundle=self.bundle,
            )
            for p in range(self.processes)
        ]
        try:
            self._restart_aggregator_mid_round(self.total_rounds - 1)
            self._kill_clients_mid_round(self.total_rounds)
            self.servers[-1].wait_for_log(rf"round {self.total_rounds}/{self.total_rounds} committed", 600)
            for process in self.client_processes[self.victims :]:
                if process.wait(120) != 0:
                    raise AssertionError("a surviving client process failed:\n" + process.log[-5000:])
            self.servers[-1].terminate()
        finally:
            for process in (*self.client_processes, *self.servers):
                process.kill()
        self.report.wall_s = time.monotonic() - started
        self._measure()
        self._check()
        return self.report

    def _restart_aggregator_mid_round(self, round_id: int) -> None:
        server = self.servers[-1]
        server.wait_for_log(rf"round {round_id}/{self.total_rounds}: sampled", 600)
        server.wait_for_log(rf"round {round_id}: update from", 600, times=self.report.clients // 2)
        server.kill()
        self.servers.append(AggregatorProcess(self.config))
        self.report.aggregator_restarts += 1

    def _kill_clients_mid_round(self, round_id: int) -> None:
        """SIGKILL the first `victims` client processes once all their clients train this round."""
        self.servers[-1].wait_for_log(rf"round {round_id}/{self.total_rounds}: sampled", 600)
        for process in self.client_processes[: self.victims]:
            process.wait_for_log(rf"trained round {round_id}$", 600, times=self.per_process)
        for process in self.client_processes[: self.victims]:
            process.kill()
        self.report.killed_clients = self.victims * self.per_process

    def _log_times(self, pattern: str) -> list[float]:
        return [stamp for server in self.servers for stamp, _ in server.matching(pattern)]

    def _measure(self) -> None:
        accepted = [
            (stamp, int(match.group(2)))
            for process in self.client_processes
            for stamp, match in process.matching(ACCEPTED)
        ]
        records = SQLiteStore(self.workdir / "state.sqlite", read_only=True).rounds()
        for record in records:
            label = f"round {record.round_id}/{self.total_rounds}"
            opened = min(self._log_times(rf"{label}: sampled"))
            committed = max(self._log_times(rf"{label} committed"))
            heard = sorted(stamp for stamp, round_id in accepted if round_id == record.round_id)
            updates, latency = len(record.clients), committed - opened
            burst = len(heard) / (heard[-1] - heard[0]) if len(heard) > 1 else float("nan")
            self.report.rounds.append(
                RoundFigures(record.round_id, updates, latency, updates / latency, burst)
            )

    def _check(self) -> None:
        store = SQLiteStore(self.workdir / "state.sqlite", read_only=True)
        index = {t.client_id: int(t.label.split()[1]) for t in store.tokens() if t.client_id}
        committed = {
            (index[c.client_id], record.round_id) for record in store.rounds() for c in record.clients
        }
        accepted = {
            (int(match.group(1)), int(match.group(2)))
            for process in self.client_processes
            for _, match in process.matching(ACCEPTED)
        }
        self.report.accepted_updates = len(accepted)
        self.report.lost_updates = len(accepted - committed)
        previous = store.global_tensors(0)  # the spec's initial state
        for record in store.rounds():
            senders = [index[c.client_id] for c in record.clients]
            want = expected_global(previous, senders, record.round_id, "fp16", self.shape)
            got = store.global_tensors(record.round_id)
            self.report.wrong_aggregates += not np.allclose(got["ctx"], want, rtol=1e-5, atol=1e-6)
            self.report.rounds_below_min_updates += len(senders) < self.report.min_updates
            previous = got


def print_report(report: LoadReport) -> None:
    print(
        f"{report.clients} clients in {report.processes} processes; aggregator killed (SIGKILL) and "
        f"restarted {report.aggregator_restarts}x mid-round; {report.killed_clients} clients killed "
        f"mid-round in the last round; min_updates {report.min_updates}"
    )
    print(f"{'round':>5} {'updates':>8} {'latency s':>10} {'updates/s':>10} {'upload burst/s':>15}")
    for r in report.rounds:
        print(
            f"{r.round_id:>5} {r.updates:>8} {r.latency_s:>10.2f} {r.updates_per_s:>10.1f} "
            f"{r.upload_burst_updates_per_s:>15.1f}"
        )
    total = sum(r.updates for r in report.rounds)
    print(
        f"total {total} updates committed in {sum(r.latency_s for r in report.rounds):.1f} s of rounds "
        f"({report.wall_s:.1f} s wall, startup included)"
    )
    print(
        f"accepted updates {report.accepted_updates}, lost {report.lost_updates}, rounds with a wrong "
        f"aggregate (an update lost or applied twice) {report.wrong_aggregates}, rounds below "
        f"min_updates {report.rounds_below_min_updates}: {'OK' if report.ok else 'FAILED'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=10, help="client processes (clients split evenly)")
    parser.add_argument("--kill-fraction", type=float, default=0.3, help="share of client processes killed")
    parser.add_argument("--train-s", type=float, default=1.0, help="seconds each client 'trains' per round")
    parser.add_argument(
        "--bundle", type=Path, required=True, help="the run's bundle (ViT-B-32: ctx 16x512, 16 KB in fp16)"
    )
    parser.add_argument("--poll-s", type=float, default=1.0, help="rounds.poll_interval_s")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedprompt-load-") as workdir:
        run = LoadRun(
            Path(workdir),
            args.clients,
            args.rounds,
            args.processes,
            args.kill_fraction,
            args.train_s,
            args.bundle,
            args.poll_s,
        )
        report = run.play()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
