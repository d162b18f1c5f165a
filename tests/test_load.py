"""A reduced run of tests/loadtest.py in the suite: 50 clients in 10 processes through 2 rounds, the
aggregator SIGKILLed and restarted mid-round 1, 30% of the clients SIGKILLed mid-round 2; nothing
accepted may be lost, no aggregate may be wrong, min_updates must hold. (The full 200-client run
is `python tests/loadtest.py`; its figures are not asserted here: timings belong to benchmarks.)"""

from __future__ import annotations

from pathlib import Path

from loadtest import LoadRun


def test_fifty_clients_survive_an_aggregator_crash_and_30_percent_dropouts(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    run = LoadRun(
        tmp_path,
        clients=50,
        rounds=2,
        processes=10,
        kill_fraction=0.3,
        train_s=0.5,
        bundle=tiny_bundle,  # ctx 16 x 64
        poll_s=0.5,
    )
    report = run.play()
    assert report.aggregator_restarts == 1 and report.killed_clients == 15
    assert report.rounds[0].updates == 50
    assert 35 <= report.rounds[1].updates < 50  # the survivors, plus victims that uploaded before dying
    assert report.accepted_updates >= 85
    assert report.lost_updates == 0 and report.wrong_aggregates == 0 and report.rounds_below_min_updates == 0
