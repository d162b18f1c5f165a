"""The server half of secure aggregation: one `SecAggServer` per session (round).

Feed it each round's messages as they arrive (`add_*`), close a round with the method that builds
the next round's messages (`roster`, `deliveries`, `unmask_request`, `signed_survivors`), and
finally call `result`.
Every incoming message is checked; a bad one raises ProtocolError and changes nothing, so a
transport can refuse that message and go on with the round.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedprompt.common.secagg.config import MAX_CLIENT_ID, SecAggConfig
from fedprompt.common.secagg.errors import ProtocolError, TooManyDropoutsError
from fedprompt.common.secagg.graph import neighbourhoods
from fedprompt.common.secagg.identity import advertisement_payload, survivors_payload, verify
from fedprompt.common.secagg.keys import pairwise_mask_seed, public_bytes
from fedprompt.common.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareUpload,
    SignedSurvivors,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from fedprompt.common.secagg.prg import expand_mask, pairwise_sign
from fedprompt.common.secagg.shamir import combine, share_x

MAX_SESSION_ID_BYTES = 256


class _Stage(Enum):
    ADVERTISE = "collecting key advertisements"
    SHARE = "collecting share uploads"
    MASK = "collecting masked inputs"
    SIGN = "collecting survivor signatures"
    UNMASK = "collecting unmask responses"
    DONE = "finished"


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """The sum of the survivors' quantised inputs modulo 2**bits (decode with `Quantizer.decode`)."""

    field_sum: np.ndarray
    survivors: tuple[int, ...]


class SecAggServer:
    """Learns the sum of the surviving clients' inputs, and which clients survived, nothing else."""

    def __init__(self, config: SecAggConfig, session_id: bytes) -> None:
        if not 1 <= len(session_id) <= MAX_SESSION_ID_BYTES:
            raise ValueError(f"session id must be 1 to {MAX_SESSION_ID_BYTES} bytes")
        self.config = config
        self.session_id = session_id
        self._stage = _Stage.ADVERTISE
        self._advertisements: dict[int, KeyAdvertisement] = {}
        self._neighbours: dict[int, frozenset[int]] = {}
        self._share_uploaders: set[int] = set()
        self._shares_for: dict[int, dict[int, EncryptedShare]] = {}  # recipient -> {sender: share}
        self._sharers: frozenset[int] = frozenset()
        self._masked: dict[int, np.ndarray] = {}
        self._survivors: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        self._signatures: dict[int, SurvivorSignature] = {}
        self._responders: set[int] = set()
        self._seed_points: dict[int, dict[int, int]] = {}  # survivor -> {x: share of its self-mask seed}
        self._key_points: dict[int, dict[int, int]] = {}  # dropped -> {x: share of its mask key}

    def _expect(self, stage: _Stage, sender: int | None = None) -> None:
        if self._stage is not stage:
            who = "" if sender is None else f" from client {sender}"
            raise ProtocolError(
                f"message{who} arrived while the server is {self._stage.value}, not {stage.value}"
            )

    # Round 0

    def add_advertisement(self, message: KeyAdvertisement) -> None:
        self._expect(_Stage.ADVERTISE, message.client_id)
        if message.client_id > MAX_CLIENT_ID or message.client_id in self._advertisements:
            raise ProtocolError(f"client id {message.client_id} is out of range or already advertised")
        if any(a.identity_key == message.identity_key for a in self._advertisements.values()):
            raise ProtocolError(f"client {message.client_id} advertised another client's identity key")
        payload = advertisement_payload(
            self.session_id, message.client_id, message.mask_public_key, message.share_public_key
        )
        verify(message.identity_key, payload, message.signature, f"the keys of client {message.client_id}")
        self._advertisements[message.client_id] = message

    def roster(self) -> Roster:
        """Close round 0: every client gets all public keys and derives the same neighbour graph."""
        self._expect(_Stage.ADVERTISE)
        if len(self._advertisements) <= self.config.threshold:
            raise TooManyDropoutsError(
                f"{len(self._advertisements)} clients advertised keys; threshold {self.config.threshold} "
                "needs at least threshold + 1"
            )
        roster = Roster(self.session_id, tuple(self._advertisements[i] for i in sorted(self._advertisements)))
        self._neighbours = neighbourhoods(self._advertisements, self.config.degree, roster.graph_seed)
        self._stage = _Stage.SHARE
        return roster

    # Round 1

    def add_share_upload(self, message: ShareUpload) -> None:
        sender = message.sender
        self._expect(_Stage.SHARE, sender)
        if sender not in self._neighbours or sender in self._share_uploaders:
            raise ProtocolError(f"share upload from client {sender}: not in the roster, or uploaded already")
        recipients = [share.recipient for share in message.shares]
        if any(share.sender != sender for share in message.shares):
            raise ProtocolError(f"client {sender} uploaded shares in another client's name")
        if len(recipients) != len(set(recipients)) or set(recipients) != self._neighbours[sender]:
            raise ProtocolError(f"client {sender} must send exactly one share to each of its neighbours")
        self._share_uploaders.add(sender)
        for share in message.shares:
            self._shares_for.setdefault(share.recipient, {})[sender] = share

    def deliveries(self) -> dict[int, ShareDelivery]:
        """Close round 1: each client that shared gets the shares its neighbours sent it. Clients left
        with fewer than `threshold` neighbours that shared are excluded (their secrets could not be
        recovered), which can exclude others in turn."""
        self._expect(_Stage.SHARE)
        sharers = set(self._share_uploaders)
        while short := {i for i in sharers if len(self._neighbours[i] & sharers) < self.config.threshold}:
            sharers -= short
        if len(sharers) <= self.config.threshold:
            raise TooManyDropoutsError(
                f"{len(sharers)} clients completed key sharing with enough neighbours; threshold "
                f"{self.config.threshold} needs at least threshold + 1"
            )
        self._sharers = frozenset(sharers)
        self._stage = _Stage.MASK
        return {
            i: ShareDelivery(i, tuple(self._shares_for[i][j] for j in sorted(self._neighbours[i] & sharers)))
            for i in sorted(sharers)
        }

    # Round 2

    def add_masked_input(self, message: MaskedInput) -> None:
        sender = message.client_id
        self._expect(_Stage.MASK, sender)
        if sender not in self._sharers or sender in self._masked:
            raise ProtocolError(f"masked input from client {sender}, who got no shares or already uploaded")
        if message.modulus_bits != self.config.modulus_bits:
            raise ProtocolError(
                f"client {sender} masked modulo 2**{message.modulus_bits}, not 2**{self.config.modulus_bits}"
            )
        values = message.values()
        if values.shape != (self.config.vector_length,):
            raise ProtocolError(
                f"client {sender} sent {values.size} values, expected {self.config.vector_length}"
            )
        self._masked[sender] = values

    def unmask_request(self) -> UnmaskRequest:
        """Close round 2: clients that uploaded survive, clients that shared keys but did not upload
        dropped; the request goes to every survivor."""
        self._expect(_Stage.MASK)
        if len(self._masked) < self.config.threshold:
            raise TooManyDropoutsError(
                f"only {len(self._masked)} masked inputs arrived; clients refuse to unmask a sum of fewer "
                f"than the threshold {self.config.threshold}"
            )
        self._survivors = tuple(sorted(self._masked))
        self._dropped = tuple(sorted(self._sharers - self._masked.keys()))
        self._seed_points = {i: {} for i in self._survivors}
        self._key_points = {i: {} for i in self._dropped}
        self._stage = _Stage.SIGN
        return UnmaskRequest(self._survivors, self._dropped)

    # Round 3 (consistency)

    def add_survivor_signature(self, message: SurvivorSignature) -> None:
        sender = message.client_id
        self._expect(_Stage.SIGN, sender)
        if sender not in self._masked or sender in self._signatures:
            raise ProtocolError(f"survivor signature from client {sender}: not a survivor, or signed already")
        payload = survivors_payload(self.session_id, self._survivors, self._dropped)
        verify(self._advertisements[sender].identity_key, payload, message.signature, f"client {sender}")
        self._signatures[sender] = message

    def signed_survivors(self) -> SignedSurvivors:
        """Close round 3: the signatures go to every signer, who unmasks only if `threshold`
        survivors signed the request it signed."""
        self._expect(_Stage.SIGN)
        if len(self._signatures) < self.config.threshold:
            raise TooManyDropoutsError(
                f"only {len(self._signatures)} survivors signed the survivor list; clients unmask only "
                f"when at least the threshold {self.config.threshold} did"
            )
        self._stage = _Stage.UNMASK
        return SignedSurvivors(tuple(self._signatures[i] for i in sorted(self._signatures)))

    # Round 4

    def add_unmask_response(self, message: UnmaskResponse) -> None:
        sender = message.client_id
        self._expect(_Stage.UNMASK, sender)
        if sender not in self._signatures or sender in self._responders:
            raise ProtocolError(f"unmask response from client {sender}: not a signer, or answered already")
        for shares, wanted, kind in (
            (message.self_seed_shares, self._seed_points, "self-mask seed"),
            (message.mask_key_shares, self._key_points, "mask key"),
        ):
            owners = [owner for owner, _ in shares]
            if len(owners) != len(set(owners)) or not set(owners) <= wanted.keys() & self._neighbours[sender]:
                raise ProtocolError(f"client {sender} sent {kind} shares of clients it was not asked about")
        self._responders.add(sender)
        x = share_x(sender)
        for owner, y in message.self_seed_shares:
            self._seed_points[owner][x] = y
        for owner, y in message.mask_key_shares:
            self._key_points[owner][x] = y

    def result(self) -> AggregateResult:
        """Close round 4: remove the survivors' self masks and the dropped clients' pairwise masks."""
        self._expect(_Stage.UNMASK)
        threshold = self.config.threshold
        secrets = ((self._seed_points, "self-mask seed"), (self._key_points, "mask key"))
        short = [
            f"{kind} of client {owner}: {len(points)} shares"
            for points_by_owner, kind in secrets
            for owner, points in points_by_owner.items()
            if len(points) < threshold
        ]
        if short:
            raise TooManyDropoutsError(
                f"too many dropouts: threshold {threshold} shares are needed, but got " + "; ".join(short)
            )
        modulus, length = self.config.modulus, self.config.vector_length
        total = modulus.zeros(length)
        for values in self._masked.values():
            total = modulus.add(total, values)
        for points in self._seed_points.values():
            total = modulus.sub(total, expand_mask(combine(points, threshold), length, modulus))
        for dropped, points in self._key_points.items():
            mask_key = X25519PrivateKey.from_private_bytes(combine(points, threshold))
            if public_bytes(mask_key) != self._advertisements[dropped].mask_public_key:
                raise ProtocolError(f"the shares of client {dropped}'s mask key do not match its public key")
            for survivor in sorted(self._neighbours[dropped] & self._masked.keys()):
                peer_public = self._advertisements[survivor].mask_public_key
                pairwise = expand_mask(
                    pairwise_mask_seed(mask_key, peer_public, self.session_id), length, modulus
                )
                # the survivor added sign * mask; take it back out
                total = modulus.add_signed(total, pairwise, -pairwise_sign(survivor, dropped))
        self._stage = _Stage.DONE
        return AggregateResult(total, self._survivors)
