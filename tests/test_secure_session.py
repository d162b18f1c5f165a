"""The aggregator's side of a secure round (`aggregator.secure_rounds.SecureSession`) driven by
real devices (`edge_client.secure_upload`, one thread each): what could make the round discard a
sum is checked before any client is asked to unmask, `done` waits until the round accepted the
sum, and a sum discarded afterwards leaves every member's update spent (it must train afresh)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from aggregator.config import SecureAggregationConfig
from aggregator.secure_rounds import SecureSession
from edge_client.device_identity import PeerPins
from edge_client.secure_upload import Outcome, secure_upload
from fedprompt.common.secagg.identity import DeviceIdentity
from fedprompt.common.secure_round import StepReply

MEMBERS = [f"c-{i}" for i in range(5)]


class SessionChannel:
    """A device's `SecureChannel` straight into the session, recording every reply."""

    def __init__(self, session: SecureSession, client: str, lock: threading.Lock) -> None:
        self.session, self.client, self.lock = session, client, lock
        self.replies: list[tuple[int, str]] = []

    def exchange(self, step: int, message: bytes, layout=(), privacy=None) -> StepReply:
        with self.lock:
            specs = [(name, tuple(shape)) for name, shape in layout]
            reply = self.session.handle(
                self.client, step, message, specs, dict(privacy or {}), set(MEMBERS), time.time()
            )
        self.replies.append((step, reply.status))
        return reply


def run_members(vet: Callable[[list[str]], str | None], controller: Callable[[SecureSession], None]):
    identities = {client: DeviceIdentity.generate() for client in MEMBERS}
    session = SecureSession(
        SecureAggregationConfig(enabled=True, threshold=3, step_timeout_s=20.0),
        b"session-under-test",
        MEMBERS,
        0.0,
        time.time() + 20.0,
        4 << 20,
        device_keys={client: identity.public_key for client, identity in identities.items()},
        vet=vet,
    )
    lock = threading.Lock()
    channels = {client: SessionChannel(session, client, lock) for client in MEMBERS}
    outcomes: dict[str, Outcome] = {}

    def member(client: str) -> None:
        tensors = {"ctx": np.full((2, 3), 0.1 * MEMBERS.index(client))}
        outcomes[client] = secure_upload(
            session.params(client), tensors, 1, {}, {}, channels[client], identities[client], PeerPins(None)
        )

    threads = [threading.Thread(target=member, args=(client,)) for client in MEMBERS]
    for thread in threads:
        thread.start()
    controller(session)
    for thread in threads:
        thread.join(60)
    return session, channels, outcomes


def test_a_sum_the_round_could_not_use_is_refused_before_anyone_is_asked_to_unmask() -> None:
    session, channels, outcomes = run_members(
        lambda survivors: "fewer than rounds.min_updates", lambda s: None
    )

    assert "fewer than rounds.min_updates; nothing unmasked" in session.failure
    assert session.result is None
    assert all((2, "next") not in channel.replies for channel in channels.values())  # no unmask request
    assert set(outcomes.values()) == {Outcome.SPENT}  # their masked inputs went out: train afresh


@pytest.mark.parametrize("accepted", [True, False])
def test_done_comes_only_once_the_round_accepted_the_sum(accepted: bool) -> None:
    def round_decides(session: SecureSession) -> None:
        give_up = time.time() + 60
        while session.result is None and time.time() < give_up:
            time.sleep(0.05)
        time.sleep(0.6)  # the members ask again meanwhile: they must be kept waiting
        assert session.result is not None
        if accepted:
            session.accept()
        else:
            session.fail("the sum includes c-3, whose token was revoked")

    session, channels, outcomes = run_members(lambda survivors: None, round_decides)

    assert session.result.count == len(MEMBERS)
    np.testing.assert_allclose(session.result.tensors["ctx"], np.full((2, 3), 1.0), atol=1e-3)
    for channel in channels.values():
        assert channel.replies.count((4, "pending")) >= 2  # asked again while the round decided
    assert set(outcomes.values()) == {Outcome.SUMMED if accepted else Outcome.SPENT}
