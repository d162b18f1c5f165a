"""Test helpers: a real `fedprompt aggregator serve` subprocess on a free loopback port, and a raw
protocol client that speaks the wire contract through the public generated stub."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np

from fedprompt.common.codec import decode_tensor_set, encode_tensor_set, iter_chunks, join_chunks
from protos import fedprompt_pb2 as pb
from protos import fedprompt_pb2_grpc as pb_grpc

FEDPROMPT = str(Path(sys.executable).with_name("fedprompt"))


def write_config(
    path: Path, rounds: Mapping[str, object], server: Mapping[str, object] | None = None
) -> Path:
    """A TOML config with a state file next to it and port 0 (the OS picks a free port)."""

    def table(name: str, values: Mapping[str, object]) -> str:
        lines = [f"[{name}]"]
        lines += [f"{key} = {value!r}".replace("'", '"') for key, value in values.items()]
        return "\n".join(lines)

    server = {"port": 0, "state": "state.sqlite", **(server or {})}
    path.write_text(table("server", server) + "\n\n" + table("rounds", rounds) + "\n")
    return path


class AggregatorProcess:
    """`fedprompt aggregator serve --config FILE` in a subprocess; its log is collected."""

    def __init__(self, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [FEDPROMPT, "aggregator", "serve", "--config", str(config), *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(60) or not self.port:
            self.kill()
            raise AssertionError("aggregator did not start:\n" + self.log)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            found = re.search(r"listening on [\d.]+:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(re.search(pattern, line) for line in self.lines):
                return
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log}")

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(20)


class RawClient:
    """A device that sends prepared updates through the public stub (no training)."""

    def __init__(self, address: str, token: str, max_message_bytes: int = 4 * 2**20) -> None:
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.AggregatorStub(self.channel)
        reply = self.stub.Enroll(pb.EnrollRequest(token=token, client_name="raw"), timeout=10)
        self.client_id, self.session, self.run_id = reply.client_id, reply.session, reply.run_id

    def pull(self) -> tuple[pb.TaskHeader, dict[str, np.ndarray]]:
        stream = self.stub.PullTask(pb.PullTaskRequest(session=self.session), timeout=10)
        header = next(stream).header
        payload = join_chunks((c.data for c in stream), header.payload_bytes, 1 << 30)
        return header, decode_tensor_set(payload)

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
    ) -> pb.PushUpdateReply:
        payload = encode_tensor_set(tensors, "fp32") if payload is None else payload
        header = pb.UpdateHeader(
            session=self.session,
            run_id=self.run_id,
            round_id=round_id,
            num_examples=num_examples,
            metrics=dict(metrics or {}),
            privacy=dict(privacy or {}),
            payload_bytes=len(payload),
        )
        chunks = [
            pb.UpdateChunk(header=header),
            *(pb.UpdateChunk(data=c) for c in iter_chunks(payload, chunk_bytes)),
        ]
        return self.stub.PushUpdate(iter(chunks), timeout=20)

    def fetch_global(self) -> tuple[pb.ModelHeader, dict[str, np.ndarray]]:
        stream = self.stub.FetchGlobal(pb.FetchGlobalRequest(session=self.session), timeout=10)
        header = next(stream).header
        return header, decode_tensor_set(join_chunks((c.data for c in stream), header.payload_bytes, 1 << 30))

    def close(self) -> None:
        self.channel.close()
