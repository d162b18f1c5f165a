"""Hostile and broken clients against a real aggregator process: revoked and replayed
credentials, every kind of malformed or out-of-bounds update, a malicious update under robust
aggregation, and a property-based fuzz of the whole PushUpdate path. Each gets a clear status, the
daemon logs it and goes on, and the committed state stays exactly what the honest clients sent."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from aggregator_process import (
    FEDPROMPT,
    SERVE,
    AggregatorProcess,
    LightClients,
    LoggedProcess,
    RawClient,
    free_port,
    write_config,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_federated import client_command, write_image_folder

from aggregator.config import (
    AggregationConfig,
    AggregatorConfig,
    ConfigError,
    RoundConfig,
    SecureAggregationConfig,
    ServerConfig,
)
from aggregator.store import SQLiteStore
from protos import fedprompt_pb2 as pb
from protos import fedprompt_pb2_grpc as pb_grpc

ROUNDS = {
    "rounds": 1,
    "min_clients": 3,
    "min_fit": 3,
    "min_updates": 2,
    "round_timeout_s": 30.0,
    "poll_interval_s": 0.1,
    "heartbeat_interval_s": 0.5,
    "client_timeout_s": 10.0,
}
SHAPE = (16, 64)  # the default n_ctx and the fedprompt-test bundle's text width
LEDGER_SERVE = (sys.executable, str(Path(__file__).with_name("ledger_aggregator.py")))
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def start(
    tmp_path: Path,
    tokens: int,
    rounds: dict | None = None,
    server: dict | None = None,
    extra: str = "",
    *,
    tiny_bundle: Path,
):
    config = write_config(
        tmp_path / "aggregator.toml", {**ROUNDS, **(rounds or {})}, server, bundle=tiny_bundle
    )
    config.write_text(config.read_text() + extra)
    store = SQLiteStore(tmp_path / "state.sqlite")
    issued = [store.issue_token(f"device {i}") for i in range(tokens)]
    store.close()
    return AggregatorProcess(config, "--rounds", "1"), issued


def honest(index: int) -> np.ndarray:
    return np.full(SHAPE, 0.1 * (index + 1), np.float32)


def refused(call, code: grpc.StatusCode) -> str:
    """Run `call`, which must fail with `code`; return the status details."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    assert error.value.code() == code, error.value.details()
    return error.value.details()


def test_revoked_and_replayed_credentials_are_refused_at_once(tmp_path: Path, tiny_bundle: Path) -> None:
    server, tokens = start(tmp_path, 3, tiny_bundle=tiny_bundle)
    try:
        stale = RawClient(server.address, tokens[0])
        device = RawClient(server.address, tokens[0])  # enrolling again replaces the session
        assert (
            refused(stale.pull, grpc.StatusCode.UNAUTHENTICATED) == "unknown or revoked session; enrol again"
        )
        others = [RawClient(server.address, token) for token in tokens[1:]]
        assert device.wait_for_task()[0].round_id == 1
        assert device.push(1, {"ctx": honest(0)}, 10).accepted

        token_id = tokens[0].split(".")[0]
        revoke = [FEDPROMPT, "aggregator", "token", "revoke", "--state", str(tmp_path / "state.sqlite")]
        assert subprocess.run([*revoke, token_id], capture_output=True).returncode == 0
        refused(device.pull, grpc.StatusCode.UNAUTHENTICATED)  # its live session ends at once
        refused(lambda: device.push(1, {"ctx": honest(0)}, 10), grpc.StatusCode.UNAUTHENTICATED)
        details = refused(lambda: RawClient(server.address, tokens[0]), grpc.StatusCode.PERMISSION_DENIED)
        assert details == "enrolment token has been revoked"

        for index, client in enumerate(others, start=1):
            assert client.wait_for_task()[0].status == pb.TRAIN
            assert client.push(1, {"ctx": honest(index)}, 10).accepted
            if index == 1:  # the same update again, while the round is open
                refused(lambda: others[0].push(1, {"ctx": honest(1)}, 10), grpc.StatusCode.ALREADY_EXISTS)
        server.wait_for_log(r"round 1/1 committed: 2 clients")
        assert "round 1 is closed" in refused(lambda: others[1].push(1, {"ctx": honest(2)}, 10), PRECONDITION)
        server.wait_for_log(rf"dropping the update of c-{token_id}, whose token was revoked")
    finally:
        server.kill()
    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    (record,) = store.rounds()
    assert record.metrics["clients"] == sorted(client.client_id for client in others)
    np.testing.assert_allclose(store.global_tensors(1)["ctx"], (honest(1) + honest(2)) / 2, rtol=1e-6)


def raw_payload(array: np.ndarray, dtype: str = "float32") -> bytes:
    """`ctx` as a payload built by hand: the codec's encoder would refuse to make a bad one."""
    tensor = pb.Tensor(
        name="ctx", dtype=dtype, shape=list(array.shape), encoding=pb.FP32, data=array.tobytes()
    )
    return pb.TensorSet(tensors=[tensor]).SerializeToString()


def test_each_kind_of_bad_input_is_refused_with_a_clear_status_and_the_round_goes_on(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    limits = {"max_message_mb": 0.25, "chunk_kb": 64, "max_payload_mb": 0.1, "update_encoding": "fp32"}
    server, tokens = start(
        tmp_path,
        3,
        server=limits,
        extra="\n[aggregation]\nmax_update_norm = 100.0\n",
        tiny_bundle=tiny_bundle,
    )
    try:
        clients = [RawClient(server.address, token) for token in tokens]
        sender = clients[0]
        sender.wait_for_task()
        good = honest(0)
        bad_pushes = {
            "unknown method": (dict(tensors={"ctx": good}, num_examples=1, method="fedprox"), INVALID),
            "wrong dtype": (dict(tensors={}, num_examples=1, payload=raw_payload(good, "int32")), INVALID),
            "Inf in a tensor": (
                dict(tensors={}, num_examples=1, payload=raw_payload(np.full(SHAPE, np.inf, np.float32))),
                INVALID,
            ),
            "absurd example count": (dict(tensors={"ctx": good}, num_examples=2**40), INVALID),
            "norm far above the bound": (dict(tensors={"ctx": good + 1e4}, num_examples=1), INVALID),
            "payload over max_payload_mb": (
                dict(tensors={"ctx": np.zeros((200, 200), np.float32)}, num_examples=1),
                INVALID,
            ),
            "payload longer than announced": (
                dict(tensors={"ctx": good}, num_examples=1, announced_bytes=10),
                INVALID,
            ),
            "message over max_message_mb": (
                dict(
                    tensors={},
                    num_examples=1,
                    payload=bytes(300_000),
                    chunk_bytes=300_000,
                    announced_bytes=50,
                ),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ),
            "wrong run": (dict(tensors={"ctx": good}, num_examples=1, run_id="run-forged"), PRECONDITION),
        }
        for reason, (update, code) in bad_pushes.items():
            with pytest.raises(grpc.RpcError) as error:
                sender.push(1, **update)
            assert error.value.code() == code, error.value.details()
            assert error.value.details() and "\n" not in error.value.details(), reason
            final = dict(error.value.trailing_metadata() or ()).get("fedprompt-refusal") == "final"
            assert final == (reason == "unknown method"), reason  # no update of another method can fit
        refused(lambda: sender.push_chunks([pb.UpdateChunk(data=b"x")]), INVALID)  # no header first
        header = pb.UpdateChunk(header=pb.UpdateHeader(session=sender.session, payload_bytes=1))
        refused(lambda: sender.push_chunks([header, header]), INVALID)  # a second header
        garbage = sender.channel.unary_unary("/fedprompt.v1.Aggregator/Heartbeat")
        assert refused(lambda: garbage(b"\xff\xff\xff", timeout=5), INVALID) == "malformed request message"
        unknown = sender.channel.unary_unary("/fedprompt.v1.Aggregator/Explode")
        refused(lambda: unknown(b"", timeout=5), grpc.StatusCode.UNIMPLEMENTED)

        for index, client in enumerate(clients):  # the round goes on with the honest updates
            client.wait_for_task()
            assert client.push(1, {"ctx": honest(index)}, 10).accepted
        server.wait_for_log(r"round 1/1 committed: 3 clients")
        logged = server.count(r"PushUpdate refused for") + server.count(r"PushUpdate for .* cut off: ")
        assert logged == len(bad_pushes) + 2  # one line each, headerless and two-header pushes too
        assert server.count(r"Heartbeat refused for .*: malformed request message") == 1
        assert "Traceback" not in server.log and server.proc.poll() is None
    finally:
        server.kill()
    expected = (honest(0) + honest(1) + honest(2)) / 3
    np.testing.assert_allclose(
        SQLiteStore(tmp_path / "state.sqlite").global_tensors(1)["ctx"], expected, rtol=1e-6
    )


def test_one_malicious_update_moves_the_median_only_inside_the_honest_range(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    robust = '\n[aggregation]\nrule = "median"\nmax_update_norm = 2000.0\n'
    server, tokens = start(
        tmp_path, 4, {"min_clients": 4, "min_fit": 4, "min_updates": 4}, extra=robust, tiny_bundle=tiny_bundle
    )
    try:
        clients = [RawClient(server.address, token) for token in tokens]
        for client in clients:
            client.wait_for_task()
        attacker, honest_clients = clients[0], clients[1:]
        refused(lambda: attacker.push(1, {"ctx": np.full(SHAPE, 1e6, np.float32)}, 10**6), INVALID)
        assert attacker.push(1, {"ctx": np.full(SHAPE, 50.0, np.float32)}, 10**6).accepted  # under the bound
        for index, client in enumerate(honest_clients, start=1):
            assert client.push(1, {"ctx": honest(index)}, 10).accepted
        server.wait_for_log(r"round 1/1 committed: 4 clients")
    finally:
        server.kill()
    ctx = SQLiteStore(tmp_path / "state.sqlite").global_tensors(1)["ctx"]
    assert np.all(ctx >= honest(1)) and np.all(ctx <= honest(3))  # FedAvg would give about 50
    np.testing.assert_allclose(ctx, (honest(2) + honest(3)) / 2, rtol=1e-6)


FUZZ_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path):
    """An aggregator waiting for more clients than there are, so every update that survives all
    checks is still refused (no round is open) and nothing the fuzzer sends can be committed."""
    folder = tmp_path_factory.mktemp("fuzz")
    server, tokens = start(folder, 1, {"min_clients": 3}, tiny_bundle=tiny_bundle)
    client = RawClient(server.address, tokens[0])
    yield server, client, folder
    server.kill()


def tensors_strategy() -> st.SearchStrategy[bytes]:
    tensor = st.builds(
        pb.Tensor,
        name=st.sampled_from(["ctx", "", "x"]),
        dtype=st.sampled_from(["float32", "float16", "float64", "int32", "object", ""]),
        shape=st.lists(st.integers(-2, 6), max_size=3),
        encoding=st.integers(0, 5),
        data=st.binary(max_size=96),
        scale=st.floats(allow_nan=True, allow_infinity=True),
    )
    structured = st.lists(tensor, max_size=3).map(lambda ts: pb.TensorSet(tensors=ts).SerializeToString())
    return st.one_of(structured, st.binary(max_size=256))


# mostly valid header fields, so that most examples get as far as the tensor decoder
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    session=st.sampled_from(["valid"] * 4 + ["", "forged"]),
    run=st.sampled_from(["valid"] * 4 + ["run-forged"]),
    round_id=st.integers(0, 2**64 - 1),
    num_examples=st.one_of(st.integers(1, 1000), st.integers(0, 2**64 - 1)),
    values=st.dictionaries(st.text(max_size=8), st.floats(allow_nan=False, allow_infinity=False), max_size=3)
    | st.dictionaries(st.text(max_size=8), st.floats(), max_size=3),
    method=st.sampled_from(["", "", "promptfl", "dpfpl"]),
    payload=tensors_strategy(),
    announced=st.one_of(st.none(), st.none(), st.integers(0, 2**64 - 1)),
    chunk_bytes=st.integers(1, 64),
)
def test_fuzzed_updates_through_a_real_server_never_break_it(
    fuzz_target, session, run, round_id, num_examples, values, method, payload, announced, chunk_bytes
) -> None:
    server, client, _ = fuzz_target
    header = pb.UpdateHeader(
        session=client.session if session == "valid" else session,
        run_id=client.run_id if run == "valid" else run,
        round_id=round_id,
        num_examples=num_examples,
        metrics=values,
        privacy=values,
        payload_bytes=len(payload) if announced is None else announced,
        method=method,
    )
    chunks = [pb.UpdateChunk(header=header)]
    chunks += [pb.UpdateChunk(data=payload[i : i + chunk_bytes]) for i in range(0, len(payload), chunk_bytes)]
    with pytest.raises(grpc.RpcError) as error:
        client.push_chunks(chunks)
    assert error.value.code() in FUZZ_CODES, error.value.details()
    event(
        re.sub(r"\d+|'[^']*'", "#", error.value.details())[:48]
    )  # which check: --hypothesis-show-statistics
    assert server.proc.poll() is None


def test_after_the_fuzz_the_daemon_serves_and_its_state_is_untouched(fuzz_target) -> None:
    server, client, folder = fuzz_target
    assert client.pull()[0].status == pb.WAIT
    assert "Traceback" not in server.log and server.count("failed for") == 0
    store = SQLiteStore(folder / "state.sqlite", read_only=True)
    assert store.rounds() == [] and store.open_round() is None


def test_bad_reports_are_refused_at_the_door_and_never_reach_the_commit(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """Each report that once stopped the round driver or filled the store and log (issue 10,
    points 1 and 7) is refused with INVALID_ARGUMENT; the honest round commits as sent."""
    server, tokens = start(tmp_path, 3, server={"max_examples": 1000}, tiny_bundle=tiny_bundle)
    forged = "dev\n2026-01-01 00:00:00 INFO round 1/1 committed\x1b[2J"
    try:
        clients = [RawClient(server.address, tokens[0], name=forged)]
        clients += [RawClient(server.address, token, name="x" * 3_000_000) for token in tokens[1:]]
        sender = clients[0]
        sender.wait_for_task()
        good = {"ctx": honest(0)}
        bad_reports = {
            "epsilon without delta": dict(privacy={"epsilon": 3.0}),
            "negative epsilon": dict(privacy={"epsilon": -5.0, "delta": 1e-5}),
            "delta of 1": dict(privacy={"epsilon": 1.0, "delta": 1.0}),
            "unknown privacy key": dict(privacy={"epsilon": 1.0, "delta": 1e-5, "trust_me": 1.0}),
            "accuracy 1e300": dict(metrics={"accuracy": 1e300}),
            "100,000 metric keys": dict(metrics={f"m{i}": 0.5 for i in range(100_000)}),
            "num_examples 2^31-1": dict(num_examples=2**31 - 1),
            "num_examples over server.max_examples": dict(num_examples=1001),
        }
        for reason, bad in bad_reports.items():
            update = {"num_examples": 10, **bad}
            details = refused(lambda update=update: sender.push(1, good, **update), INVALID)
            assert details and "\n" not in details and len(details) < 400, reason
        for index, client in enumerate(clients):
            client.wait_for_task()
            report = {"epsilon": 1.5 + index, "delta": 1e-5} if index else {}  # dp = "none" sends none
            assert client.push(1, {"ctx": honest(index)}, 10, {"accuracy": 0.5}, report).accepted
        server.wait_for_log(r"round 1/1 committed: 3 clients")
        assert server.count("PushUpdate refused for") == len(bad_reports)
        assert "\x1b" not in server.log and max(len(line) for line in server.lines) < 1000
        assert server.count(r"round 1/1 committed: ") == 1 and server.count(r"enrolled \(dev\?2026") == 1
        assert "Traceback" not in server.log
        assert server.proc.poll() is None
    finally:
        server.kill()
    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    (record,) = store.rounds()
    assert record.metrics["epsilon_max"] == 3.5 and record.metrics["client_metrics"] == {"accuracy": 0.5}
    np.testing.assert_allclose(store.global_tensors(1)["ctx"], (honest(0) + honest(1) + honest(2)) / 3)
    names = [row[0] for row in store._query("SELECT name FROM clients ORDER BY name")]
    assert names[0] == "dev?2026-01-01 00:00:00 INFO round 1/1 committed?[2J"
    assert all(name.isprintable() and len(name) < 100 for name in names)


def test_a_round_whose_aggregation_fails_is_played_again_and_the_daemon_lives(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """The server half raises in its first aggregation (after changing its state, as a bug
    would): one log line, the round is taken up again from the store with its updates, and the
    committed state holds nothing of the failed attempt."""
    config = write_config(tmp_path / "aggregator.toml", ROUNDS, bundle=tiny_bundle)
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token() for _ in range(3)]
    store.close()
    server = AggregatorProcess(config, "--rounds", "1", "--fail-aggregations", "1", command=LEDGER_SERVE)
    try:
        clients = [RawClient(server.address, token) for token in tokens]
        for index, client in enumerate(clients):
            client.wait_for_task()
            assert client.push(1, {"ctx": honest(index)}, 10).accepted
        server.wait_for_log(r"round 1/1 committed: 3 clients")
        (failure,) = server.matching(r"round 1 failed \((.*)\); playing it again with its updates in 2 s")
        assert failure[1].group(1) == "ArithmeticError: injected aggregation failure"
        assert "Traceback" not in server.log and server.proc.poll() is None
        assert clients[0].fetch_global()[0].round_id == 1
    finally:
        server.kill()
    store = SQLiteStore(tmp_path / "state.sqlite", read_only=True)
    (record,) = store.rounds()
    assert store.latest_round().strategy_state["ledger"] == [record.metrics["clients"]]
    np.testing.assert_allclose(store.global_tensors(1)["ctx"], (honest(0) + honest(1) + honest(2)) / 3)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("server", "chunk_kb", 0), ("server", "chunk_kb", -4), ("rounds", "poll_interval_s", 0.0)],
)
def test_an_out_of_range_config_value_stops_the_daemon_at_start_with_one_line(
    tmp_path: Path, section: str, key: str, value: float
) -> None:
    sections = {"server": {"port": 0, "state": "s.sqlite"}, "rounds": {}}
    sections[section][key] = value
    config = tmp_path / "aggregator.toml"
    config.write_text(
        "".join(
            f"[{name}]\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
            for name, values in sections.items()
        ).replace("'", '"')
    )
    done = subprocess.run([*SERVE, "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"{section}.{key} must be in" in line and f"got {value}" in line


class SilentStreams:
    """`count` calls that never send a byte, kept open: PushUpdate streams, and PullTask calls
    opened as a raw HTTP/2 client may (headers, no message). Each one the aggregator refuses or
    cuts is opened again after `reopen_s`, for as long as the flood lasts."""

    def __init__(self, address: str, count: int, reopen_s: float = 0.5) -> None:
        self.channels = [grpc.insecure_channel(address) for _ in range(8)]
        self.reopen_s, self.stop = reopen_s, threading.Event()
        self.ended: list[tuple[grpc.StatusCode, float]] = []  # (status, seconds it was held open)
        self.lock = threading.RLock()  # done callbacks may run inside `open`
        for index in range(count):
            self.open(index)

    def silence(self):
        self.stop.wait()
        yield from ()

    def open(self, index: int) -> None:
        with self.lock:  # not while `close` closes the channels
            if self.stop.is_set():
                return
            channel = self.channels[index % len(self.channels)]
            opened = time.monotonic()
            if index % 2:
                future = pb_grpc.AggregatorStub(channel).PushUpdate.future(self.silence(), timeout=120)
            else:
                future = channel.stream_stream("/fedprompt.v1.Aggregator/PullTask")(
                    self.silence(), timeout=120
                )
            future.add_done_callback(lambda done: self.ended_one(index, done, opened))

    def ended_one(self, index: int, done: grpc.Future, opened: float) -> None:
        if self.stop.is_set():
            return
        with self.lock:
            self.ended.append((done.code(), time.monotonic() - opened))
        threading.Timer(self.reopen_s, self.open, (index,)).start()

    def close(self) -> None:
        with self.lock:
            self.stop.set()
        for channel in self.channels:
            channel.close()


def test_200_silent_streams_neither_stall_nor_slow_four_real_clients(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """Strangers holding calls open without a byte get a few places, each cut at the
    first-message deadline, the rest refused at once; real clients, which show their session (or
    token) in the call's metadata, enrol and play their rounds as fast as without the flood."""
    rules = {**ROUNDS, "rounds": 3, "min_clients": 4, "min_fit": 4, "min_updates": 4}
    limits = {"first_message_timeout_s": 2.0}
    durations, elapsed = {}, {}
    for flood in (False, True):
        folder = tmp_path / ("flood" if flood else "calm")
        folder.mkdir()
        config = write_config(folder / "aggregator.toml", rules, limits, bundle=tiny_bundle)
        store = SQLiteStore(folder / "state.sqlite")
        (folder / "tokens").write_text("\n".join(store.issue_token() for _ in range(4)))
        store.close()
        server = AggregatorProcess(config)
        streams = SilentStreams(server.address, 200) if flood else None
        try:
            time.sleep(3.0 if flood else 0.0)  # the places of strangers are all taken
            started = time.monotonic()
            args = (server.address, folder / "tokens", folder / "clients", 0, 4, "--train-s", "0.3")
            clients = LightClients(*args, bundle=tiny_bundle)
            assert clients.wait(60) == 0, clients.log[-3000:]
            elapsed[flood] = time.monotonic() - started
            server.wait_for_log(r"round 3/3 committed: 4 clients")
            if flood:
                ended = list(streams.ended)
                held = [seconds for code, seconds in ended if code == grpc.StatusCode.CANCELLED]
                refused_at_once = [code for code, _ in ended if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
                assert held and refused_at_once and len(held) + len(refused_at_once) == len(ended)
                assert all(1.9 < seconds < 4.0 for seconds in held)
                cut = r"(PushUpdate|PullTask) refused for .*: cut: no first message within 2 s"
                assert server.count(cut) >= len(held) and server.count(r"PullTask refused for .*: cut") >= 1
                assert server.proc.poll() is None and "Traceback" not in server.log
        finally:
            if streams is not None:
                streams.close()
            server.kill()
        records = SQLiteStore(folder / "state.sqlite", read_only=True).rounds()
        durations[flood] = [record.metrics["duration_s"] for record in records]
    calm, flooded = durations[False], durations[True]
    assert len(flooded) == 3 and max(flooded) < max(calm) + 1.5, (calm, flooded)
    assert elapsed[True] < elapsed[False] + 3.0, elapsed  # enrolment and polling included


def test_an_enrolled_client_is_bounded_in_open_calls_and_cut_when_idle(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    limits = {"idle_timeout_s": 1.0, "first_message_timeout_s": 30.0, "max_calls_per_client": 3}
    server, tokens = start(tmp_path, 3, server=limits, tiny_bundle=tiny_bundle)
    stop = threading.Event()
    try:
        device = RawClient(server.address, tokens[0])
        header = pb.UpdateChunk(header=pb.UpdateHeader(session=device.session, payload_bytes=10))

        def header_then_silence():
            yield header
            stop.wait()

        def silence():
            stop.wait()
            yield from ()

        opened = [device.stub.PushUpdate.future(silence(), metadata=device.metadata) for _ in range(3)]
        time.sleep(0.5)
        details = refused(lambda: device.pull(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert details == f"{device.client_id} already has 3 calls open (server.max_calls_per_client)"
        assert not any(future.done() for future in opened)  # waiting for a first message (30 s)
        stop.set()
        for future in opened:
            future.exception(timeout=10)
        stop.clear()
        started = time.monotonic()
        refused(lambda: device.push_chunks(header_then_silence()), grpc.StatusCode.CANCELLED)
        assert 0.9 < time.monotonic() - started < 3.0
        server.wait_for_log(r"PushUpdate refused for .*: cut: no next message within 1 s")
        assert device.pull()[0].status == pb.WAIT  # its places are free again
    finally:
        stop.set()
        server.kill()


def test_refused_dp_updates_cost_each_device_one_training_per_round(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """`max_update_norm` far below what client-level DP noise gives: every honest update is
    refused. Each device pays for one training of round 1 (its saved accountant), keeps the
    refused update, says why in one line and sits the round out while the round is extended; the
    aggregator says why it refuses and stops waiting for them. Device 0 also has a corrupt image,
    which `--skip-bad-images` leaves out with a count in its log."""
    rounds = {**ROUNDS, "min_clients": 2, "min_fit": 2, "min_updates": 2, "round_timeout_s": 3.0}
    config = write_config(tmp_path / "aggregator.toml", rounds, bundle=tiny_bundle)
    training = '[training]\nn_ctx = 4\nbatch_size = 8\ndp = "client"\nnoise_multiplier = 1.0\n'
    config.write_text(config.read_text() + "\n[aggregation]\nmax_update_norm = 0.001\n" + training)
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token() for _ in range(2)]
    store.close()
    server = AggregatorProcess(config)
    devices = []
    try:
        for index, token in enumerate(tokens):
            data = write_image_folder(tmp_path / f"data{index}", seed=index)
            command = client_command(server.address, tiny_bundle, data, tmp_path / f"device{index}")
            if index == 0:
                (data / "disc" / "broken.png").write_bytes(b"\x89PNG not an image")
                command.append("--skip-bad-images")
            devices.append(LoggedProcess([*command, "--token", token, "--connect-timeout", "120"]))
        refusal = (
            r"PushUpdate refused for .*: update is [\d.]+ away from the global model, above max_update_norm"
        )
        server.wait_for_log(refusal, timeout=240, times=2)
        server.wait_for_log(r"not waiting for c-\w+, whose update was refused", times=2)
        extended = server.count(r"round 1: 0 of 2 required updates; extended")
        server.wait_for_log(r"round 1: 0 of 2 required updates; extended", times=extended + 3)  # > 9 s
        for device in devices:
            assert device.count(r"round 1/1: training") == 1, device.log[-3000:]
            (line,) = [line for line in device.lines if "update refused" in line or "sitting" in line]
            assert "update refused (INVALID_ARGUMENT: update is" in line and "sitting the round out" in line
            assert device.proc.poll() is None
        skipped = r"skipped 1 unreadable image\(s\) of 19 in .*data0 \(first: .*broken.png: "
        assert devices[0].count(skipped) == 1
    finally:
        for process in (*devices, server):
            process.kill()
    for index in range(2):
        state = tmp_path / f"device{index}"
        history = json.loads((state / "privacy_accountant.json").read_text())["history"]
        assert history == [[0.5, 1.0, 1]]  # one client-level round: sigma / 2, rate 1, one step
        assert (state / "pending-update.refused").read_text().startswith("INVALID_ARGUMENT: update is")
    assert SQLiteStore(tmp_path / "state.sqlite", read_only=True).rounds() == []


def test_a_corrupt_image_stops_a_device_in_one_line_unless_skipped(tiny_bundle: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", seed=0)
    (data / "checks" / "broken.png").write_bytes(b"not an image at all")
    command = client_command(
        "127.0.0.1:9", tiny_bundle, data, tmp_path / "device", "--connect-timeout", "0.5"
    )
    done = subprocess.run([*command, "--token", "x.y"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert "broken.png" in line


def test_a_token_revoked_mid_round_ends_that_clients_part_at_once(tmp_path: Path, tiny_bundle: Path) -> None:
    server, tokens = start(
        tmp_path, 3, tiny_bundle=tiny_bundle
    )  # client_timeout_s 10: the round would wait that long
    try:
        clients = [RawClient(server.address, token) for token in tokens]
        for client in clients:
            client.wait_for_task()
        for index, client in enumerate(clients[:2]):
            assert client.push(1, {"ctx": honest(index)}, 10).accepted
        time.sleep(1.0)
        assert server.count(r"round 1/1 committed") == 0  # waiting for the third, which is live
        token_id = tokens[2].split(".")[0]
        revoke = [FEDPROMPT, "aggregator", "token", "revoke", "--state", str(tmp_path / "state.sqlite")]
        assert subprocess.run([*revoke, token_id], capture_output=True).returncode == 0
        revoked_at = time.monotonic()
        server.wait_for_log(r"round 1/1 committed: 2 clients", timeout=10)
        assert time.monotonic() - revoked_at < 3.0
        assert server.count(rf"round 1: c-{token_id}'s token was revoked; not waiting for it") == 1
    finally:
        server.kill()


def test_down_bytes_count_a_task_pulled_before_a_restart_of_the_daemon(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    """A client that pulled round 2's task, then uploads to the restarted daemon without pulling it
    again, is counted with that task's bytes (it was counted 0 and `down KB` was wrong)."""
    config = write_config(
        tmp_path / "aggregator.toml", {**ROUNDS, "rounds": 2}, {"port": free_port()}, bundle=tiny_bundle
    )
    store = SQLiteStore(tmp_path / "state.sqlite")
    tokens = [store.issue_token() for _ in range(3)]
    store.close()
    server = AggregatorProcess(config)
    try:
        clients = [RawClient(server.address, token) for token in tokens]
        for index, client in enumerate(clients):
            client.wait_for_task()
            assert client.push(1, {"ctx": honest(index)}, 10).accepted
        server.wait_for_log(r"round 1/2 committed: 3 clients")
        tasks = [client.wait_for_task()[0] for client in clients]
        assert {task.round_id for task in tasks} == {2}
        server.kill()  # kill -9 after every client pulled its task
        server = AggregatorProcess(config)
        for index, client in enumerate(clients):
            assert client.push(2, {"ctx": honest(index)}, 10).accepted
        server.wait_for_log(r"round 2/2 committed: 3 clients")
    finally:
        server.kill()
    record = SQLiteStore(tmp_path / "state.sqlite", read_only=True).rounds()[1]
    assert record.metrics["bytes_down_per_client"] == tasks[0].payload_bytes > 0
    assert {client.bytes_down for client in record.clients} == {tasks[0].payload_bytes}


def test_every_numeric_config_value_has_a_range_checked_at_start() -> None:
    """Each numeric key of each section, set just outside its range, is one ConfigError naming it."""
    for section in (ServerConfig, RoundConfig, AggregationConfig, SecureAggregationConfig):
        numeric = [f.name for f in dataclasses.fields(section) if f.type in ("int", "float")]
        assert sorted(numeric) == sorted(section.RANGES), section.NAME
        for name, allowed in section.RANGES.items():
            outside = allowed.low - 1 if allowed.low > -math.inf else allowed.high * 2
            kind = type(getattr(section(), name))
            with pytest.raises(ConfigError) as error:
                dataclasses.replace(
                    AggregatorConfig(), **{section.NAME: section(**{name: kind(outside)})}
                ).check()
            (line,) = str(error.value).splitlines()
            assert line.startswith(f"{section.NAME}.{name} must be in "), line


def test_a_device_killed_while_training_says_it_pays_for_the_round_again(
    tmp_path: Path, tiny_bundle: Path
) -> None:
    rules = {**ROUNDS, "min_clients": 1, "min_fit": 1, "min_updates": 1}
    server, tokens = start(tmp_path, 1, rules, tiny_bundle=tiny_bundle)
    (tmp_path / "tokens").write_text(tokens[0])
    args = (server.address, tmp_path / "tokens", tmp_path / "clients", 0, 1)
    first = LightClients(*args, "--train-s", "60", bundle=tiny_bundle)
    again = None
    try:
        first.wait_for_log(r"trained round 1")  # training has started (and, under DP, been paid for)
        first.kill()
        again = LightClients(*args, "--train-s", "0.1", bundle=tiny_bundle)
        assert again.wait(60) == 0, again.log[-3000:]
        assert again.count(r"round 1: training again: its last training was interrupted") == 1
        assert first.count(r"training again") == 0
        server.wait_for_log(r"round 1/1 committed: 1 clients")
    finally:
        for process in (first, again, server):
            if process is not None:
                process.kill()
