"""The edge client's runtime against real aggregators over loopback."""

from __future__ import annotations

import socket
import time
from itertools import islice

import pytest

from edge_client.runtime import AggregatorLink, ClientError, backoff_delays
from protos import fedprompt_pb2 as pb


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    delays = list(islice(backoff_delays(base_s=0.5, cap_s=8.0), 10))
    for n, delay in enumerate(delays):
        ceiling = min(8.0, 0.5 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, so clients spread out


def test_an_unreachable_aggregator_fails_with_one_line_within_the_patience() -> None:
    address = f"127.0.0.1:{closed_port()}"
    link = AggregatorLink(address, patience_s=2.0, rpc_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(ClientError) as error:
        link.call("enrol", lambda: link.stub.Enroll(pb.EnrollRequest(token="t"), timeout=1.0))
    assert time.monotonic() - started < 6.0
    message = str(error.value)
    assert message.startswith(f"cannot reach the aggregator at {address}") and "\n" not in message
    link.close()
