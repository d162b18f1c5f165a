"""Light edge clients for reliability and load tests: the real client runtime (`ClientRuntime`:
enrolment, polling, heartbeats, backoff, saved uploads, TLS) driving a method that sends a
prepared update instead of training. One process runs several clients, one thread each:

    python tests/light_clients.py --aggregator 127.0.0.1:PORT --tokens FILE --state-dir DIR \\
        [--first 0 --count 50] [--train-s 0.5] [--crash-round R --crash-after-step S]

Client i (line i of FILE, counted from 0) sends ctx = (the ctx it received, or zeros) +
`prepared_delta(i, round)` with `examples(i)` examples, so `expected_global` can recompute every
committed round from the store. Every line printed starts with the client's thread name,
`client-I`, and the tests read "client-I trained round R" and "client-I round R: update accepted".

With --crash-round R and --crash-after-step S, the process exits at once (no cleanup, like kill -9)
as soon as the aggregator has taken its secure-aggregation message of step S in round R: a client
dropping out between two steps. Give each such client its own process.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from aggregator.config import ServerConfig
from edge_client.methods.base import ClientHalf, RoundResult, RoundTask
from edge_client.runtime import AggregatorLink, ClientError, ClientRuntime
from edge_client.tls import channel_security
from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.codec import decode_tensor_set, encode_tensor_set
from protos import fedprompt_pb2 as pb

log = logging.getLogger("fedprompt.client")
SHAPE = (16, 64)  # the default n_ctx and the fedprompt-test bundle's text width
CRASH_EXIT = 17


def examples(index: int) -> int:
    return 10 + index % 7


def prepared_delta(index: int, round_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """A small step, different for every client and round."""
    grid = np.arange(math.prod(shape), dtype=np.float64).reshape(shape) / math.prod(shape)
    return ((index + 1) * round_id / 100 * (grid - 0.5)).astype(np.float32)


def prepared_update(index: int, round_id: int, received: dict[str, np.ndarray], shape: tuple[int, ...]):
    base = received.get("ctx", np.zeros(shape, np.float32))
    return {"ctx": (base + prepared_delta(index, round_id, shape)).astype(np.float32)}


def expected_global(
    previous: dict[str, np.ndarray],
    indices: Iterable[int],
    round_id: int,
    encoding: str,
    shape=SHAPE,
    task_encoding: str = ServerConfig.task_encoding,
) -> np.ndarray:
    """FedAvg of what clients `indices` send in `round_id` on top of `previous` as they receive it
    (through the task encoding), as the aggregator decodes it (through the update encoding)."""
    received = decode_tensor_set(encode_tensor_set(previous, task_encoding))
    total, weights = 0.0, 0
    for index in indices:
        sent = decode_tensor_set(
            encode_tensor_set(prepared_update(index, round_id, received, shape), encoding)
        )
        total = total + examples(index) * sent["ctx"].astype(np.float64)
        weights += examples(index)
    return total / weights


class PreparedUpdate(ClientHalf):
    """Stands in for training on the run's bundle: waits `train_s` (the runtime heartbeats
    meanwhile), then returns the prepared update."""

    name = "promptfl"

    def __init__(self, index: int, train_s: float, shape: tuple[int, ...], bundle: Path) -> None:
        self.index, self.train_s, self.shape = index, train_s, shape
        self._digest = BundleDims.read(bundle).digest

    @property
    def bundle_digest(self) -> str:
        return self._digest

    def run_round(self, task: RoundTask) -> RoundResult:
        log.info("trained round %d", task.round_id)
        time.sleep(self.train_s)
        tensors = prepared_update(self.index, task.round_id, task.tensors, self.shape)
        return RoundResult(tensors, examples(self.index), {"accuracy": 0.5})


class CrashAfterStep:
    """The real stub, except that the process dies right after SecAggStep took the message of
    (round, step)."""

    def __init__(self, stub: object, round_id: int, step: int) -> None:
        self._stub, self._when = stub, (round_id, step)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stub, name)

    def SecAggStep(self, request: pb.SecAggRequest, **kwargs: object) -> pb.SecAggReply:
        reply = self._stub.SecAggStep(request, **kwargs)
        if request.message and (request.round_id, request.step) == self._when:
            log.info("crashing after step %d of round %d", request.step, request.round_id)
            sys.stdout.flush()
            os._exit(CRASH_EXIT)
        return reply


class CrashingLink(AggregatorLink):
    def __init__(self, *args: object, crash: tuple[int, int] | None, **kwargs: object) -> None:
        self.crash = crash
        super().__init__(*args, **kwargs)

    def _open(self) -> None:
        super()._open()
        if self.crash is not None:
            self.stub = CrashAfterStep(self.stub, *self.crash)


def run_client(index: int, token: str, args: argparse.Namespace, failures: list[int]) -> None:
    security = channel_security(args.aggregator, args.ca_cert, args.client_cert, args.client_key)
    crash = None if args.crash_round is None else (args.crash_round, args.crash_after_step)
    link = CrashingLink(
        args.aggregator, patience_s=args.patience, rpc_timeout_s=10.0, security=security, crash=crash
    )
    method = PreparedUpdate(index, args.train_s, tuple(args.shape), args.bundle)
    runtime = ClientRuntime(
        link, lambda _: method, args.state_dir / f"client-{index}", token, f"light-{index}"
    )
    try:
        final = runtime.run()
        log.info("finished after round %d", final["round_id"])
    except ClientError as error:
        log.error("stopped: %s", error)
        failures.append(index)
    finally:
        link.close()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aggregator", required=True, help="HOST:PORT")
    parser.add_argument("--tokens", type=Path, required=True, help="enrolment tokens, one per line")
    parser.add_argument("--bundle", type=Path, required=True, help="the run's bundle folder")
    parser.add_argument("--state-dir", type=Path, required=True, help="client-I/ state folders go here")
    parser.add_argument("--first", type=int, default=0, help="index of the first client of this process")
    parser.add_argument("--count", type=int, default=1, help="clients in this process")
    parser.add_argument("--train-s", type=float, default=0.0, help="seconds each round 'trains'")
    parser.add_argument("--shape", type=int, nargs="+", default=list(SHAPE), help="shape of ctx")
    parser.add_argument("--patience", type=float, default=60.0, help="give up after this long unreachable")
    parser.add_argument("--crash-round", type=int, default=None, help="round in which to crash")
    parser.add_argument("--crash-after-step", type=int, default=0, help="secure step after which to crash")
    parser.add_argument("--ca-cert", type=Path, default=None)
    parser.add_argument("--client-cert", type=Path, default=None)
    parser.add_argument("--client-key", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(threadName)s %(message)s", stream=sys.stdout, force=True
    )
    tokens = args.tokens.read_text().split()
    failures: list[int] = []
    threads = [
        threading.Thread(target=run_client, args=(i, tokens[i], args, failures), name=f"client-{i}")
        for i in range(args.first, args.first + args.count)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
