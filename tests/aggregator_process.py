"""Test helpers: a real `fedprompt aggregator serve` subprocess on a free loopback port, and a raw
protocol client that speaks the wire contract through the public generated stub."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np

from fedprompt.common.codec import decode_tensor_set, encode_tensor_set, iter_chunks, join_chunks
from fedprompt.common.network import session_metadata
from protos import fedprompt_pb2 as pb
from protos import fedprompt_pb2_grpc as pb_grpc

FEDPROMPT = str(Path(sys.executable).with_name("fedprompt"))
SERVE = (FEDPROMPT, "aggregator", "serve")


def free_port() -> int:
    """A loopback port nobody listens on right now (for restarts on a known port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(
    path: Path,
    rounds: Mapping[str, object],
    server: Mapping[str, object] | None = None,
    *,
    bundle: Path,
    method: str = "promptfl",
) -> Path:
    """A TOML config for a run of `method` on `bundle` (a bundle folder), with a state file next to
    it and port 0 (the OS picks a free port). Callers append [training] and method sections."""

    def table(name: str, values: Mapping[str, object]) -> str:
        lines = [f"[{name}]"]
        lines += [f"{key} = {value!r}".replace("'", '"') for key, value in values.items()]
        return "\n".join(lines)

    server = {"port": 0, "state": "state.sqlite", **(server or {})}
    named = {"name": method, "bundle": str(Path(bundle) / "manifest.json")}
    tables = [table("server", server), table("rounds", rounds), table("method", named)]
    path.write_text("\n\n".join(tables) + "\n")
    return path


class LoggedProcess:
    """A subprocess whose output lines (stdout and stderr together) are collected as they come,
    with the monotonic time each arrived (`stamps`)."""

    def __init__(self, command: list[str]) -> None:
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.stamps: list[float] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stamps.append(time.monotonic())
            self.lines.append(line.rstrip())
            self.on_line(line)
        self.on_line("")

    def on_line(self, line: str) -> None:
        """Called for every line, and with "" when the output ends."""

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def matching(self, pattern: str) -> list[tuple[float, re.Match]]:
        """(arrival time, match) of every line matching `pattern` so far."""
        lines = list(self.lines)  # the reader appends the stamp first, so zip stops at the lines
        found = ((stamp, re.search(pattern, line)) for stamp, line in zip(self.stamps, lines, strict=False))
        return [(stamp, match) for stamp, match in found if match]

    def count(self, pattern: str) -> int:
        return len(self.matching(pattern))

    def wait_for_log(self, pattern: str, timeout: float = 30.0, times: int = 1) -> None:
        """Until `times` lines match `pattern`; fails early if the process ends first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self._reader.is_alive():
            if self.count(pattern) >= times:
                return
            time.sleep(0.05)
        if self.count(pattern) < times:
            raise AssertionError(f"not {times} line(s) matching {pattern!r}:\n{self.log[-20000:]}")

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(20)

    def kill(self) -> None:
        """SIGKILL (kill -9), if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(20)


class AggregatorProcess(LoggedProcess):
    """`fedprompt aggregator serve --config FILE` (or another `command` taking the same
    arguments) in a subprocess, started and listening."""

    def __init__(self, config: Path, *args: str, command: tuple[str, ...] = SERVE) -> None:
        self.port = 0
        self._ready = threading.Event()
        super().__init__([*command, "--config", str(config), *args])
        if not self._ready.wait(60) or not self.port:
            self.kill()
            raise AssertionError("aggregator did not start:\n" + self.log)

    def on_line(self, line: str) -> None:
        found = re.search(r"listening on [\w.:]+:(\d+)", line)
        if found:
            self.port = int(found.group(1))
        if found or not line:
            self._ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class LightClients(LoggedProcess):
    """`tests/light_clients.py`: clients first .. first+count-1 of `tokens` in one process."""

    def __init__(
        self, address: str, tokens: Path, state_dir: Path, first: int, count: int, *extra: str, bundle: Path
    ):
        script = str(Path(__file__).with_name("light_clients.py"))
        where = ["--aggregator", address, "--tokens", str(tokens), "--state-dir", str(state_dir)]
        where += ["--bundle", str(bundle)]
        which = ["--first", str(first), "--count", str(count)]
        super().__init__([sys.executable, script, *where, *which, *extra])


class RawClient:
    """A device that sends prepared updates through the public stub (no training)."""

    def __init__(
        self,
        address: str,
        token: str,
        max_message_bytes: int = 4 * 2**20,
        credentials: grpc.ChannelCredentials | None = None,
        name: str = "raw",
    ) -> None:
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.stub = pb_grpc.AggregatorStub(self.channel)
        reply = self.stub.Enroll(pb.EnrollRequest(token=token, client_name=name), timeout=10)
        self.client_id, self.session, self.run_id = reply.client_id, reply.session, reply.run_id
        self.metadata = session_metadata(self.session)  # as the edge client shows it to the door

    def pull(self) -> tuple[pb.TaskHeader, dict[str, np.ndarray]]:
        stream = self.stub.PullTask(
            pb.PullTaskRequest(session=self.session), timeout=10, metadata=self.metadata
        )
        header = next(stream).header
        payload = join_chunks((c.data for c in stream), header.payload_bytes, 1 << 30)
        return header, decode_tensor_set(payload)

    def heartbeat(self, round_id: int) -> pb.HeartbeatReply:
        request = pb.HeartbeatRequest(session=self.session, round_id=round_id)
        return self.stub.Heartbeat(request, timeout=10, metadata=self.metadata)

    def wait_for_task(self, timeout: float = 30.0) -> tuple[pb.TaskHeader, dict[str, np.ndarray]]:
        """Poll like a real client until told to train or that the run is finished."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            header, tensors = self.pull()
            if header.status in (pb.TRAIN, pb.FINISHED):
                return header, tensors
            time.sleep(header.retry_after_s)
        raise AssertionError(f"{self.client_id} got no task within {timeout} s")

    def push(
        self,
        round_id: int,
        tensors: Mapping[str, np.ndarray],
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
        privacy: Mapping[str, float] | None = None,
        payload: bytes | None = None,
        chunk_bytes: int = 1 << 16,
        method: str = "",
        run_id: str | None = None,
        announced_bytes: int | None = None,
    ) -> pb.PushUpdateReply:
        """An update as a client could send it; the keywords make it wrong in one respect."""
        payload = encode_tensor_set(tensors, "fp32") if payload is None else payload
        header = pb.UpdateHeader(
            session=self.session,
            run_id=self.run_id if run_id is None else run_id,
            round_id=round_id,
            num_examples=num_examples,
            metrics=dict(metrics or {}),
            privacy=dict(privacy or {}),
            payload_bytes=len(payload) if announced_bytes is None else announced_bytes,
            method=method,
        )
        chunks = [
            pb.UpdateChunk(header=header),
            *(pb.UpdateChunk(data=c) for c in iter_chunks(payload, chunk_bytes)),
        ]
        return self.push_chunks(chunks)

    def push_chunks(self, chunks: list[pb.UpdateChunk]) -> pb.PushUpdateReply:
        return self.stub.PushUpdate(iter(chunks), timeout=20, metadata=self.metadata)

    def fetch_global(self) -> tuple[pb.ModelHeader, dict[str, np.ndarray]]:
        stream = self.stub.FetchGlobal(
            pb.FetchGlobalRequest(session=self.session), timeout=10, metadata=self.metadata
        )
        header = next(stream).header
        return header, decode_tensor_set(join_chunks((c.data for c in stream), header.payload_bytes, 1 << 30))

    def close(self) -> None:
        self.channel.close()
