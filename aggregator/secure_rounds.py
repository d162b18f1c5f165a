"""Secure aggregation of a round over the network: the server side of the SecAggStep RPC.

One `SecureSession` per attempt at a round drives the core's `SecAggServer`
(`fedprompt.common.secagg`) with the members' messages as they arrive. Its four steps close:

- step 0 (key advertisements) while the members train: when every member has advertised or gone
  silent (no call for `client_timeout_s`), or at the round's deadline;
- steps 1-4 (share uploads, masked inputs, survivor signatures, unmask responses): when every
  client still expected has answered or gone silent, or `step_timeout_s` after the previous step
  closed.

Everything that could make the round discard a recovered sum (rounds.min_updates, a revoked
survivor) is checked by `vet` when the masked inputs are in, before the unmask request goes out:
a second sum of the same inputs without one of them would reveal it. A member is told `done`
only once the round has accepted the sum (`accept`); until then it keeps its update.

A client missing a step is a dropout, and the core's recovery (Shamir shares of its secrets) keeps
the sum of the others while `threshold` clients answer every step. Past that the attempt fails with
the core's `TooManyDropoutsError` line and the coordinator starts a new attempt with a new session
id, hence fresh keys; nothing of an attempt is persisted, so a restarted daemon also starts the
open round's secure aggregation again (clients whose masked input had not gone out resend their
saved update, without training; the others train afresh).

The threshold of a session is the configured one raised to a majority of the members (of a
neighbourhood with SecAgg+), which is what devices require by default. Each member's key
advertisement must be signed by the device key registered at its enrolment.

What the server learns in a session: which members took part at each step (so who survived), the
sum over the survivors of their weighted, clipped, quantised vectors (`fedprompt.common.
secure_round`), the privacy report each sends in the clear, and message sizes. It never sees an
individual update: every masked input is uniform modulo 2**bits without the other members' masks.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence

import grpc
import numpy as np

from aggregator.config import AggregatorConfig, SecureAggregationConfig
from aggregator.strategies.base import ServerStrategy
from fedprompt.common.secagg import (
    KeyAdvertisement,
    MaskedInput,
    MessageFormatError,
    ProtocolError,
    Quantizer,
    SecAggConfig,
    SecAggServer,
    ShareUpload,
    TooManyDropoutsError,
    UnmaskResponse,
)
from fedprompt.common.secagg.messages import SurvivorSignature
from fedprompt.common.secagg.modulus import Modulus
from fedprompt.common.secagg.policy import ThresholdFloor
from fedprompt.common.secure_round import (
    STEPS,
    LayoutError,
    SecureRoundParams,
    StepReply,
    SumLayout,
    WeightedSum,
)

DONE = len(STEPS)
POLL_S = 0.2
"""How long a client waits before asking again while a step is open."""
MESSAGE_OVERHEAD_BYTES = 4096
_MESSAGES = (KeyAdvertisement, ShareUpload, MaskedInput, SurvivorSignature, UnmaskResponse)
Vet = Callable[[list[str]], str | None]
"""Why a sum of these survivors could not be used (None: it could): checked before unmasking."""


class StepRefused(Exception):
    """A step message the session turns down (the session goes on); a gRPC status and one line."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SecureSession:
    """One attempt at securely summing the members' updates of a round."""

    def __init__(
        self,
        settings: SecureAggregationConfig,
        session_id: bytes,
        members: Iterable[str],
        example_cap: float,
        deadline_unix: float,
        max_message_bytes: int,
        expected_layout: SumLayout | None = None,
        device_keys: dict[str, bytes] | None = None,
        vet: Vet = lambda survivors: None,
    ) -> None:
        self.settings = settings
        self.session_id = session_id
        self.members = {client: index for index, client in enumerate(sorted(members))}
        self._names = {index: client for client, index in self.members.items()}
        self.device_keys = device_keys or {}
        self.vet = vet
        self.threshold = session_threshold(settings, len(self.members))
        self.accepted = False
        self.example_cap = example_cap
        self.deadline_unix = deadline_unix
        self.max_message_bytes = max_message_bytes
        self.layout = expected_layout
        self.step = 0
        self.expected: set[str] = set(self.members)  # who the open step waits for
        self.answered: list[set[str]] = [set() for _ in STEPS]  # whose message of each step arrived
        self.failure: str | None = None
        self.failure_logged = False
        self.result: WeightedSum | None = None
        self.survivors: list[str] = []
        self.dropped: list[str] = []
        self.privacy: dict[str, dict[str, float]] = {}
        self.bytes_up = dict.fromkeys(self.members, 0)
        self.bytes_down = dict.fromkeys(self.members, 0)
        self._server: SecAggServer | None = None
        self._roster_size = 0
        self._openers: dict[int, bytes | dict[str, bytes]] = {}  # server message opening step s + 1

    def params(self, client_id: str) -> SecureRoundParams:
        """What the task tells a member about this session."""
        s = self.settings
        return SecureRoundParams(
            self.session_id,
            self.members[client_id],
            self.threshold,
            s.degree or None,
            s.modulus_bits,
            s.value_bound,
            self.example_cap,
            tuple(sorted(self.members)),
        )

    def has_begun(self, client_id: str) -> bool:
        """True once the member has sent anything (it then answers through SecAggStep only), or
        for a client that is not a member."""
        return self.step > 0 or client_id in self.answered[0] or client_id not in self.members

    def fail(self, reason: str) -> None:
        """End the attempt; members are told `reason` at their next step."""
        self.failure = reason

    def accept(self) -> None:
        """The round takes the sum: the members are told `done`."""
        self.accepted = True

    # ---- messages --------------------------------------------------------------------------

    def handle(
        self,
        client_id: str,
        step: int,
        message: bytes,
        layout: Sequence[tuple[str, Sequence[int]]],
        privacy: dict[str, float],
        live: set[str],
        now: float,
    ) -> StepReply:
        """Take the member's message of `step` (none: it asks again), close the step if that was
        the last one awaited, and answer where the member stands."""
        if client_id not in self.members:
            return self._aborted("not a member of this secure aggregation session")
        if not 0 <= step < DONE:
            raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, f"step must be 0..{DONE - 1}, got {step}")
        if message and self.failure is None:
            self._receive(client_id, step, message, layout, privacy)
            self.advance(live, now)
        return self._reply(client_id, step, now)

    def _receive(
        self,
        client_id: str,
        step: int,
        message: bytes,
        layout: Sequence[tuple[str, Sequence[int]]],
        privacy: dict[str, float],
    ) -> None:
        if step > self.step:
            raise StepRefused(grpc.StatusCode.FAILED_PRECONDITION, f"step {STEPS[step]} is not open yet")
        if step < self.step or client_id not in self.expected:
            return  # too late: the reply tells it that it was left out
        if client_id in self.answered[step]:
            raise StepRefused(grpc.StatusCode.ALREADY_EXISTS, f"{STEPS[step]} already received")
        try:
            parsed = _MESSAGES[step].from_bytes(message)
            if _sender(parsed) != self.members[client_id]:
                raise ProtocolError("a message must carry its sender's own member id")
            if step == 0:
                self._fix_layout(layout)
                if parsed.identity_key != self.device_keys.get(client_id):
                    raise ProtocolError(
                        "the advertisement is not signed with the device key registered at enrolment"
                    )
            self._feed(step, parsed)
        except MessageFormatError as error:
            raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except ProtocolError as error:
            raise StepRefused(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None
        if step == 2:
            self.privacy[client_id] = dict(privacy)
        self.answered[step].add(client_id)
        self.bytes_up[client_id] += len(message)

    def _fix_layout(self, specs: Sequence[tuple[str, Sequence[int]]]) -> None:
        """The first advertisement's layout fixes the vector (unless the strategy already knows
        it); every later one must announce the same."""
        try:
            layout = SumLayout.from_specs(specs)
        except LayoutError as error:
            raise StepRefused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if self.layout is not None and layout != self.layout:
            raise StepRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"summed tensors {layout.tensors} differ from {self.layout.tensors}",
            )
        width = Modulus(self.settings.modulus_bits).width
        if layout.length * width + MESSAGE_OVERHEAD_BYTES > self.max_message_bytes:
            raise StepRefused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a masked vector of {layout.length} values does not fit one message of "
                f"server.max_message_mb; raise it",
            )
        self.layout = layout
        if self._server is None:
            config = SecAggConfig(
                layout.length,
                self.threshold,
                self.settings.modulus_bits,
                self.settings.degree or None,
            )
            self._server = SecAggServer(config, self.session_id)

    def _feed(self, step: int, message: object) -> None:
        server = self._server
        if step == 0:
            server.add_advertisement(message)
        elif step == 1:
            server.add_share_upload(message)
        elif step == 2:
            server.add_masked_input(message)
        elif step == 3:
            server.add_survivor_signature(message)
        else:
            server.add_unmask_response(message)

    def _reply(self, client_id: str, step: int, now: float) -> StepReply:
        deadline_in_s = max(0.0, self.deadline_unix - now)
        if self.failure is not None:
            return self._aborted(self.failure)
        if client_id not in self.answered[step]:
            return self._aborted(
                f"no {STEPS[step]} arrived from this client in time; left out of this attempt"
            )
        if step == DONE - 1 and self.step == DONE and self.accepted:
            return StepReply("done")  # only once the round took the sum: a discarded one must reach it
        if step == DONE - 1 and self.step == DONE:
            return StepReply("pending", retry_after_s=POLL_S, deadline_in_s=deadline_in_s)
        if self.step == step:
            return StepReply("pending", retry_after_s=POLL_S, deadline_in_s=deadline_in_s)
        if self.step > step + 1 or client_id not in self.expected:
            return self._aborted(f"left out of this attempt after its {STEPS[step]}")
        opener = self._openers[step]
        message = opener[client_id] if isinstance(opener, dict) else opener
        self.bytes_down[client_id] += len(message)
        return StepReply("next", message, deadline_in_s=deadline_in_s)

    def _aborted(self, reason: str) -> StepReply:
        return StepReply("aborted", reason=reason)

    # ---- closing steps ---------------------------------------------------------------------

    def advance(self, live: set[str], now: float) -> bool:
        """Close the open step if nobody live is still expected, or its deadline passed; returns
        True when something changed."""
        if self.failure is not None or self.step == DONE:
            return False
        waiting = (self.expected - self.answered[self.step]) & live
        if waiting and now < self.deadline_unix:
            return False
        try:
            self._close(self.step)
        except TooManyDropoutsError as error:
            self.fail(f"{STEPS[self.step]}: {error}")
            return True
        self.step += 1
        self.deadline_unix = now + self.settings.step_timeout_s
        return True

    def _close(self, step: int) -> None:
        server = self._server
        if server is None:
            raise TooManyDropoutsError("no member advertised keys")
        if step == 0:
            roster = server.roster()
            self._roster_size = len(roster.advertisements)
            self._openers[0] = roster.to_bytes()
            self.expected = {self._names[a.client_id] for a in roster.advertisements}
        elif step == 1:
            deliveries = server.deliveries()
            self._openers[1] = {self._names[i]: d.to_bytes() for i, d in deliveries.items()}
            self.expected = set(self._openers[1])
        elif step == 2:
            request = server.unmask_request()
            survivors = sorted(self._names[i] for i in request.survivors)
            unusable = self.vet(survivors)
            if unusable:
                raise TooManyDropoutsError(f"{unusable}; nothing unmasked")
            self._openers[2] = request.to_bytes()
            self.expected = set(survivors)
            self.dropped = sorted(self._names[i] for i in request.dropped)
        elif step == 3:
            signed = server.signed_survivors()
            self._openers[3] = signed.to_bytes()
            self.expected = {self._names[s.client_id] for s in signed.signatures}
        else:
            result = server.result()
            self.survivors = sorted(self._names[i] for i in result.survivors)
            quantizer = Quantizer(self.settings.value_bound, self._roster_size, self.settings.modulus_bits)
            total = quantizer.decode(result.field_sum, len(result.survivors))
            self.result = self.layout.unpack(total, len(result.survivors))

    def summary(self) -> dict[str, object]:
        """The session as recorded with the round: who survived, who dropped, the parameters."""
        return {
            "survivors": len(self.survivors),
            "dropped_after_sharing": len(self.dropped),
            "members": len(self.members),
            "threshold": self.threshold,
            "degree": self.settings.degree,
            "modulus_bits": self.settings.modulus_bits,
            "value_bound": self.settings.value_bound,
            "example_cap": self.example_cap,
            "vector_length": 0 if self.layout is None else self.layout.length,
        }


def session_threshold(settings: SecureAggregationConfig, members: int) -> int:
    """The configured threshold raised to the devices' default floor for this many members."""
    neighbourhood = members if not settings.degree else min(members, settings.degree + 1)
    return max(settings.threshold, ThresholdFloor().lowest(neighbourhood))


def _sender(message: object) -> int:
    return message.sender if isinstance(message, ShareUpload) else message.client_id


class SecureRounds:
    """Starts the sessions of a run whose rounds are securely aggregated."""

    def __init__(self, config: AggregatorConfig, strategy: ServerStrategy) -> None:
        """`config` was checked against the method's spec: the method allows secure aggregation."""
        self.settings = config.secure_aggregation
        self.example_cap = float(self.settings.example_cap) if strategy.weighs_by_examples else 0.0
        self.max_message_bytes = config.server.max_message_bytes

    def start(
        self,
        run_id: str,
        round_id: int,
        attempt: int,
        members: Iterable[str],
        deadline_unix: float,
        layout: SumLayout | None,
        device_keys: dict[str, bytes],
        vet: Vet,
    ) -> SecureSession:
        """A new attempt: a session id never used before (so fresh keys on every client)."""
        session_id = f"{secrets.token_hex(8)}/{round_id}/{attempt}/{run_id}".encode()
        return SecureSession(
            self.settings,
            session_id[:256],
            members,
            self.example_cap,
            deadline_unix,
            self.max_message_bytes,
            layout,
            device_keys,
            vet,
        )


def expected_layout(spec: dict[str, tuple[int, ...]] | None) -> SumLayout | None:
    """The layout the strategy expects (from its update spec), when it knows one."""
    return None if not spec else SumLayout.from_specs(spec.items())


def decoded_weight_total(total: WeightedSum, example_cap: float) -> int:
    """The examples behind a weighted sum (capped counts), or 0 when every client weighed 1."""
    return int(np.rint(total.weight * example_cap)) if example_cap else 0
