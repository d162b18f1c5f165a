"""Secure aggregation on the device: a round's result summed with the other clients' by the
SecAgg core (`fedprompt.common.secagg`), so that the aggregator never sees it.

The result's tensors, weight and accuracy metrics become one vector (`fedprompt.common.
secure_round.SumLayout`), quantised with stochastic rounding from an OS-seeded generator and
masked. Local DP noise, if any, was added by the method before: masking hides the noised update,
the noise bounds what the sum reveals. The four steps go through a `SecureChannel` (gRPC
`SecAggStep` for a device, direct calls in the in-process harness): send the step's message, ask
again while the step is open, and read the server's message that opens the next step.

A session the server aborts (too many dropouts, this client too late) or that breaks the protocol
(e.g. an unmask request that would expose one client) ends without error: the caller keeps the
update and sends it again in the round's next attempt, which comes with fresh keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import grpc
import numpy as np

from fedprompt.common.secagg import (
    Quantizer,
    Roster,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    ShareDelivery,
    UnmaskRequest,
)
from fedprompt.common.secure_round import STEPS, SecureRoundParams, StepReply, SumLayout
from protos import fedprompt_pb2 as pb

log = logging.getLogger("fedprompt.client")
GRACE_S = 10.0
"""How long past the open step's announced deadline the client keeps asking."""
_STATUS = {pb.SECAGG_PENDING: "pending", pb.SECAGG_NEXT: "next", pb.SECAGG_DONE: "done"}


class SecureChannel(Protocol):
    """Carries one step's message to the aggregator and brings back its answer."""

    def exchange(
        self,
        step: int,
        message: bytes,
        layout: Sequence[tuple[str, tuple[int, ...]]] = (),
        privacy: Mapping[str, float] | None = None,
    ) -> StepReply: ...


class SessionAborted(Exception):
    """The session ended for this client; the message says why."""


def params_from_message(message: pb.SecureAggregation) -> SecureRoundParams:
    return SecureRoundParams(
        message.session_id,
        message.member_id,
        message.threshold,
        message.degree or None,
        message.modulus_bits,
        message.value_bound,
        message.example_cap,
    )


def secure_upload(
    params: SecureRoundParams,
    tensors: Mapping[str, np.ndarray],
    num_examples: int,
    metrics: Mapping[str, float],
    privacy: Mapping[str, float],
    channel: SecureChannel,
) -> bool:
    """Take part in the session; True once this client's input is in the sum's unmasking."""
    tensors = {name: np.asarray(t) for name, t in tensors.items()}
    layout = SumLayout.of(tensors)
    config = SecAggConfig(layout.length, params.threshold, params.modulus_bits, params.degree)
    client = SecAggClient(params.member_id, config)
    try:
        roster = Roster.from_bytes(_step(channel, 0, client.advertise().to_bytes(), layout=layout.tensors))
        delivery = ShareDelivery.from_bytes(_step(channel, 1, client.share_keys(roster).to_bytes()))
        vector, clipped = layout.pack(tensors, params.weight(num_examples), dict(metrics), params.value_bound)
        if clipped:
            log.info(
                "%d of %d values clipped to +-%g before summing",
                clipped,
                layout.tensor_size,
                params.value_bound,
            )
        quantizer = Quantizer(params.value_bound, len(roster.advertisements), params.modulus_bits)
        rounding = np.random.default_rng()  # fresh OS entropy, never a seed the server knows
        masked = client.mask(delivery, quantizer.encode(vector, rounding))
        request = UnmaskRequest.from_bytes(_step(channel, 2, masked.to_bytes(), privacy=dict(privacy)))
        _step(channel, 3, client.unmask(request).to_bytes())
    except SessionAborted as reason:
        log.warning("secure aggregation session ended without this client: %s", reason)
        return False
    except SecAggError as error:
        log.warning("secure aggregation: refusing to go on: %s", error)
        return False
    return True


def _step(channel: SecureChannel, step: int, message: bytes, **extra: object) -> bytes:
    """Send the step's message and wait for the step to close; the server's next message."""
    reply = channel.exchange(step, message, **extra)
    while reply.status == "pending":
        give_up_at = time.monotonic() + reply.deadline_in_s + GRACE_S
        time.sleep(reply.retry_after_s)
        reply = channel.exchange(step, b"")
        if reply.status == "pending" and time.monotonic() > give_up_at:
            raise SessionAborted(f"the {STEPS[step]} step did not close by its deadline")
    if reply.status == "aborted":
        raise SessionAborted(reply.reason)
    log.info("secure aggregation: %s sent", STEPS[step])
    return reply.message


class GrpcSecureChannel:
    """`SecureChannel` over the SecAggStep RPC; `call` adds the session and retries transient
    failures. A refusal by the aggregator ends the session for this client."""

    def __init__(
        self,
        call: Callable[[pb.SecAggRequest], pb.SecAggReply],
        run_id: str,
        round_id: int,
        session_id: bytes,
    ) -> None:
        self._call = call
        self._base = pb.SecAggRequest(run_id=run_id, round_id=round_id, session_id=session_id)

    def exchange(
        self,
        step: int,
        message: bytes,
        layout: Sequence[tuple[str, tuple[int, ...]]] = (),
        privacy: Mapping[str, float] | None = None,
    ) -> StepReply:
        request = pb.SecAggRequest()
        request.CopyFrom(self._base)
        request.step, request.message = step, message
        request.layout.extend(pb.TensorSpec(name=name, shape=shape) for name, shape in layout)
        request.privacy.update(privacy or {})
        try:
            reply = self._call(request)
        except grpc.RpcError as error:
            return StepReply("aborted", reason=f"{error.code().name}: {error.details()}")
        if reply.status not in _STATUS:
            return StepReply("aborted", reason=reply.reason or "the aggregator ended the session")
        return StepReply(_STATUS[reply.status], reply.message, reply.retry_after_s, reply.deadline_in_s)
