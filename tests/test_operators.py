"""What operators see of a real daemon during a real run: the Prometheus endpoint scraped while
rounds are played by raw protocol clients, the standard gRPC health service, and
`fedprompt aggregator status --watch` refreshing as rounds commit."""

from __future__ import annotations

import re
import signal
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from aggregator_process import FEDPROMPT, AggregatorProcess, LoggedProcess, RawClient, write_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from test_aggregator import EXACT, FAST_ROUNDS, client_ctx, issue_tokens

from fedprompt.common.codec import encode_tensor_set
from protos import fedprompt_pb2 as pb

EPSILON = {1: 0.5, 2: 0.9}  # what the devices' accountants "report" after each round


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def health(address: str, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def push_round(clients: list[RawClient], round_id: int) -> int:
    """Every client pulls its task and pushes an update with a privacy report; the payload bytes."""
    sent = 0
    for index, client in enumerate(clients):
        header, tensors = client.wait_for_task()
        assert header.status == pb.TRAIN and header.round_id == round_id
        ctx = client_ctx(index, round_id, tensors)
        privacy = {"epsilon": EPSILON[round_id] + index / 100, "delta": 1e-5}
        assert client.push(round_id, {"ctx": ctx}, 10, privacy=privacy).accepted
        sent += len(encode_tensor_set({"ctx": ctx}, "fp32"))
    return sent


def test_metrics_health_and_status_watch_during_a_real_run(tmp_path: Path, tiny_bundle: Path) -> None:
    config = write_config(
        tmp_path / "aggregator.toml", {**FAST_ROUNDS, "rounds": 2}, EXACT, bundle=tiny_bundle
    )
    tokens = issue_tokens(tmp_path / "state.sqlite", 3)
    watch = LoggedProcess([FEDPROMPT, "aggregator", "status", "--config", str(config), "--watch", "0.2"])
    watch.wait_for_log("no run yet")
    server = AggregatorProcess(config, "--metrics", "127.0.0.1:0")
    try:
        port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log).group(1))
        before = scrape(port)
        assert before[("fedprompt_rounds_committed", ())] == 0
        assert before[("fedprompt_clients_live", ())] == 0
        assert health(server.address, "") == health_pb2.HealthCheckResponse.SERVING
        assert health(server.address, "fedprompt.v1.Aggregator") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            health(server.address, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

        clients = [RawClient(server.address, token) for token in tokens]
        uploaded = push_round(clients, 1)
        server.wait_for_log(r"round 1/2 committed")
        _, tensors = clients[0].wait_for_task()  # round 2 is open
        with pytest.raises(grpc.RpcError) as invalid:
            clients[0].push(2, {"ctx": np.zeros((4, 9), np.float32)}, 1)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            clients[1].push(1, {"ctx": client_ctx(1, 1, tensors)}, 1)  # round 1 is closed

        during = scrape(port)
        assert during[("fedprompt_rounds_committed", ())] == 1
        assert during[("fedprompt_round_open", ())] == 2
        assert during[("fedprompt_clients_live", ())] == 3
        assert during[("fedprompt_round_clients", ())] == 3
        assert during[("fedprompt_updates_accepted_total", ())] == 3
        refused = (("reason", "INVALID_ARGUMENT"), ("rpc", "PushUpdate"))
        assert during[("fedprompt_refused_total", refused)] == 1
        closed = (("reason", "FAILED_PRECONDITION"), ("rpc", "PushUpdate"))
        assert during[("fedprompt_refused_total", closed)] == 1
        run = (("kind", "device"), ("run_id", clients[0].run_id))
        assert during[("fedprompt_epsilon_spent", run)] == pytest.approx(EPSILON[1] + 0.02)
        assert during[("fedprompt_round_duration_seconds_count", ())] == 1
        # request bytes: the 3 accepted payloads, the 2 refused ones and the protobuf framing
        assert during[("fedprompt_received_bytes_total", (("rpc", "PushUpdate"),))] > uploaded
        assert during[("fedprompt_sent_bytes_total", (("rpc", "PullTask"),))] > 0
        watch.wait_for_log(r"round 2 open: 0/3 sampled clients' updates stored, deadline in \d+ s")
        assert watch.count(r"run run-\w+ +method promptfl +1 round\(s\) committed")

        push_round(clients, 2)
        server.wait_for_log(r"round 2/2 committed")
        after = scrape(port)
        assert after[("fedprompt_rounds_committed", ())] == 2
        assert after[("fedprompt_round_open", ())] == 0
        assert after[("fedprompt_updates_accepted_total", ())] == 6
        assert after[("fedprompt_round_duration_seconds_count", ())] == 2
        assert after[("fedprompt_epsilon_spent", run)] == pytest.approx(EPSILON[2] + 0.02)
        watch.wait_for_log(r"^ +2 +3 +30 +- +4\.0 +2\.0 +0\.92$")  # round 2: 16x64 ctx, up fp32, down fp16
        assert server.terminate() == 0
    finally:
        server.kill()
        watch.proc.send_signal(signal.SIGINT)  # Ctrl-C ends the watch without a traceback
        assert watch.wait(20) == 0, watch.log
    assert "Traceback" not in watch.log
