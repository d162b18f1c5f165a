"""Secure aggregation on the device: a round's result summed with the other clients' by the
SecAgg core (`fedprompt.common.secagg`), so that the aggregator never sees it.

The result's tensors, weight and accuracy metrics become one vector (`fedprompt.common.
secure_round.SumLayout`), quantised with stochastic rounding from an OS-seeded generator and
masked. Local DP noise, if any, was added by the method before: masking hides the noised update,
the noise bounds what the sum reveals. The four steps go through a `SecureChannel` (gRPC
`SecAggStep` for a device, direct calls in the in-process harness): send the step's message, ask
again while the step is open, and read the server's message that opens the next step.

Before revealing anything the client runs the core's checks (`fedprompt.common.secagg.client`):
its own threshold floor, peers' keys signed by identity keys pinned to their names (`PeerPins`),
and a survivor list that fits its view and that enough survivors signed alike.

A session the server aborts (too many dropouts, this client too late) or that breaks the protocol
ends without error. If it ended before this client's masked input went out, the caller keeps the
update and sends it again in the round's next attempt, which comes with fresh keys. Once the
masked input went out, a sum including it may have been recovered, and a second sum of the same
update without it (or with it and others) would reveal it: that update is spent (`Outcome.SPENT`)
and a new attempt needs a fresh one from fresh training. Only `done`, sent once the round has
accepted the sum, makes it `SUMMED`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Protocol

import grpc
import numpy as np

from edge_client.device_identity import PeerPins
from fedprompt.common.secagg import (
    Quantizer,
    Roster,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    ShareDelivery,
    SignedSurvivors,
    UnmaskRequest,
)
from fedprompt.common.secagg.identity import DeviceIdentity
from fedprompt.common.secagg.policy import ThresholdFloor
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


class Outcome(Enum):
    """What became of the update in one session."""

    SUMMED = "in a sum the round accepted"
    KEEP = "not sent: send it again in the next attempt"
    SPENT = "its masked input went out but the round did not accept the sum: train afresh"


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
        tuple(message.member_names),
    )


def secure_upload(
    params: SecureRoundParams,
    tensors: Mapping[str, np.ndarray],
    num_examples: int,
    metrics: Mapping[str, float],
    privacy: Mapping[str, float],
    channel: SecureChannel,
    identity: DeviceIdentity,
    pins: PeerPins,
    floor: ThresholdFloor | None = None,
    before_masked_input: Callable[[], None] = lambda: None,
) -> Outcome:
    """Take part in the session; `before_masked_input` runs (e.g. marks the saved update spent)
    right before the masked input leaves the device."""
    tensors = {name: np.asarray(t) for name, t in tensors.items()}
    layout = SumLayout.of(tensors)
    config = SecAggConfig(layout.length, params.threshold, params.modulus_bits, params.degree)
    names = params.member_names

    def trust(member_id: int, identity_key: bytes) -> bool:
        return member_id < len(names) and pins.trust(names[member_id], identity_key)

    client = SecAggClient(params.member_id, config, params.session_id, identity, trust, floor=floor)
    masked_sent = False
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
        before_masked_input()
        masked_sent = True
        request = UnmaskRequest.from_bytes(_step(channel, 2, masked.to_bytes(), privacy=dict(privacy)))
        signed = SignedSurvivors.from_bytes(_step(channel, 3, client.sign_survivors(request).to_bytes()))
        _step(channel, 4, client.unmask(signed).to_bytes())
    except SessionAborted as reason:
        log.warning("secure aggregation session ended without this client: %s", reason)
    except SecAggError as error:
        log.warning("secure aggregation: refusing this session, never answering it again: %s", error)
    else:
        return Outcome.SUMMED
    return Outcome.SPENT if masked_sent else Outcome.KEEP


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
