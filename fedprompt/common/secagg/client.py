"""The client half of secure aggregation: one `SecAggClient` per client per session (round).

Call in order: `advertise()`, `share_keys(roster)`, `mask(delivery, values)`,
`sign_survivors(request)`, `unmask(signed)`. The input to `mask` is already quantised
(`Quantizer.encode`) and, with client-level DP, already noised: masking hides the noised update,
the noise bounds what the sum reveals.

Against an active aggregator the client trusts only itself: it checks the threshold against its
own floor (`policy.ThresholdFloor`), its neighbours' keys against their long-term identity keys
(`trust`), the unmask request against its own view (`policy.check_unmask_request`), and that at
least `threshold` survivors signed the very request it was sent (the consistency round) before it
reveals a single share. Any failed check ends the session for this client: it raises, and every
later call raises RefusedError without looking at its input.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from functools import wraps
from typing import ParamSpec, TypeVar

import numpy as np

from fedprompt.common.secagg.config import MAX_CLIENT_ID, SecAggConfig
from fedprompt.common.secagg.errors import ProtocolError, RefusedError, SecAggError, UnmaskRefusedError
from fedprompt.common.secagg.graph import neighbourhoods
from fedprompt.common.secagg.identity import (
    DeviceIdentity,
    advertisement_payload,
    survivors_payload,
    verify,
)
from fedprompt.common.secagg.keys import (
    SessionKeys,
    decrypt_from_peer,
    encrypt_for_peer,
    pairwise_mask_seed,
    private_bytes,
    public_bytes,
)
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
from fedprompt.common.secagg.policy import ThresholdFloor, check_unmask_request
from fedprompt.common.secagg.prg import expand_mask, pairwise_sign
from fedprompt.common.secagg.randomness import SEED_BYTES, RandomBytes
from fedprompt.common.secagg.shamir import SHARE_BYTES, decode_share, encode_share, share_x, split

PeerTrust = Callable[[int, bytes], bool]
"""Whether an identity key is the one of the session member with that id (e.g. the key registered
at enrolment, or the one pinned the first time this device met that peer)."""
P = ParamSpec("P")
R = TypeVar("R")


def _ends_session_on_error(step: Callable[P, R]) -> Callable[P, R]:
    """A failed check refuses the whole session: the client never answers it again."""

    @wraps(step)
    def guarded(self: SecAggClient, *args: object, **kwargs: object) -> R:
        if self._refused is not None:
            raise RefusedError(f"client {self.client_id} refused this session earlier: {self._refused}")
        try:
            return step(self, *args, **kwargs)
        except SecAggError as error:
            self._refused = str(error)
            raise

    return guarded


class _Stage(Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASK = "mask"
    SIGN = "sign_survivors"
    UNMASK = "unmask"
    DONE = "nothing (the session is over)"


class SecAggClient:
    """Masks one client's input so that only the sum over surviving clients can be unmasked."""

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        session_id: bytes,
        identity: DeviceIdentity,
        trust: PeerTrust,
        randomness: RandomBytes | None = None,
        floor: ThresholdFloor | None = None,
    ) -> None:
        if not 0 <= client_id <= MAX_CLIENT_ID:
            raise ValueError(f"client id must be in [0, {MAX_CLIENT_ID}], got {client_id}")
        self.client_id = client_id
        self.config = config
        self.identity = identity
        self.floor = floor or ThresholdFloor()
        self._trust = trust
        self._random = randomness or RandomBytes()
        self._keys = SessionKeys.generate(self._random)
        self._stage = _Stage.ADVERTISE
        self._session_id = session_id
        self._refused: str | None = None
        self._request: UnmaskRequest | None = None
        self._peers: dict[int, KeyAdvertisement] = {}
        self._neighbours: frozenset[int] = frozenset()
        self._self_seed = b""
        self._seed_shares: dict[int, int] = {}  # peer -> my share of the peer's self-mask seed
        self._key_shares: dict[int, int] = {}  # peer -> my share of the peer's mask private key

    def _expect(self, stage: _Stage) -> None:
        if self._stage is not stage:
            raise ProtocolError(
                f"client {self.client_id}: the next step is {self._stage.value}, not {stage.value}"
            )

    def _own_advertisement(self) -> KeyAdvertisement:
        mask, share = public_bytes(self._keys.mask), public_bytes(self._keys.share)
        payload = advertisement_payload(self._session_id, self.client_id, mask, share)
        return KeyAdvertisement(
            self.client_id, mask, share, self.identity.public_key, self.identity.sign(payload)
        )

    @_ends_session_on_error
    def advertise(self) -> KeyAdvertisement:
        """Round 0: this session's public keys, signed with the device's identity key."""
        self._expect(_Stage.ADVERTISE)
        self._stage = _Stage.SHARE_KEYS
        return self._own_advertisement()

    def _check_roster(self, roster: Roster) -> dict[int, KeyAdvertisement]:
        """Every peer in the roster once, with one identity key each, and this client's own keys."""
        if roster.session_id != self._session_id:
            raise ProtocolError("the roster is for another session")
        peers = {a.client_id: a for a in roster.advertisements}
        identities = {a.identity_key for a in roster.advertisements}
        if len(peers) != len(roster.advertisements) or len(identities) != len(peers):
            raise ProtocolError("the roster lists a client or an identity key twice")
        if peers.get(self.client_id) != self._own_advertisement():
            raise ProtocolError(f"the roster does not carry client {self.client_id}'s own public keys")
        return peers

    def _check_identity(self, peer: int, identity_key: bytes) -> None:
        if not self._trust(peer, identity_key):
            raise RefusedError(f"client {peer}'s identity key is not the one this device trusts for it")

    def _check_keys(self, ad: KeyAdvertisement) -> None:
        """A neighbour's session keys (the ones this client uses) are signed by its trusted identity."""
        payload = advertisement_payload(
            self._session_id, ad.client_id, ad.mask_public_key, ad.share_public_key
        )
        verify(ad.identity_key, payload, ad.signature, f"the keys of client {ad.client_id}")
        self._check_identity(ad.client_id, ad.identity_key)

    @_ends_session_on_error
    def share_keys(self, roster: Roster) -> ShareUpload:
        """Round 1: Shamir shares of the self-mask seed and the mask key, encrypted per neighbour."""
        self._expect(_Stage.SHARE_KEYS)
        peers = self._check_roster(roster)
        neighbours = neighbourhoods(peers, self.config.degree, roster.graph_seed)[self.client_id]
        self.floor.check(self.config.threshold, len(neighbours) + 1)
        for peer in sorted(neighbours):
            self._check_keys(peers[peer])
        if len(neighbours) < self.config.threshold:
            raise ProtocolError(
                f"client {self.client_id} has {len(neighbours)} neighbours, fewer than the threshold "
                f"{self.config.threshold}"
            )
        self._peers, self._neighbours = peers, neighbours
        self._self_seed = self._random.take(SEED_BYTES)
        xs = {peer: share_x(peer) for peer in sorted(neighbours)}
        seed_shares = split(self._self_seed, self.config.threshold, xs.values(), self._random)
        key_shares = split(private_bytes(self._keys.mask), self.config.threshold, xs.values(), self._random)
        shares = []
        for peer, x in xs.items():
            plaintext = encode_share(seed_shares[x]) + encode_share(key_shares[x])
            nonce, ciphertext = encrypt_for_peer(
                self._keys.share,
                peers[peer].share_public_key,
                self._session_id,
                self.client_id,
                peer,
                plaintext,
                self._random,
            )
            shares.append(EncryptedShare(self.client_id, peer, nonce, ciphertext))
        self._stage = _Stage.MASK
        return ShareUpload(self.client_id, tuple(shares))

    def _open_delivery(self, delivery: ShareDelivery) -> tuple[dict[int, int], dict[int, int]]:
        """Decrypt and check every share addressed to this client: (seed shares, key shares) by sender."""
        seed_shares: dict[int, int] = {}
        key_shares: dict[int, int] = {}
        for share in delivery.shares:
            if share.recipient != self.client_id or delivery.recipient != self.client_id:
                raise ProtocolError(
                    f"client {self.client_id} was handed a share addressed to client {share.recipient}"
                )
            if share.sender not in self._neighbours or share.sender in seed_shares:
                raise ProtocolError(
                    f"client {self.client_id} got an unexpected or repeated share from {share.sender}"
                )
            plaintext = decrypt_from_peer(
                self._keys.share,
                self._peers[share.sender].share_public_key,
                self._session_id,
                share.sender,
                self.client_id,
                share.nonce,
                share.ciphertext,
            )
            if len(plaintext) != 2 * SHARE_BYTES:
                raise ProtocolError(f"the share from client {share.sender} has the wrong length")
            seed_shares[share.sender] = decode_share(plaintext[:SHARE_BYTES])
            key_shares[share.sender] = decode_share(plaintext[SHARE_BYTES:])
        if len(seed_shares) < self.config.threshold:
            raise ProtocolError(
                f"client {self.client_id} received shares from {len(seed_shares)} neighbours, fewer than the "
                f"threshold {self.config.threshold}: its secrets could not be recovered, so it won't upload"
            )
        return seed_shares, key_shares

    @_ends_session_on_error
    def mask(self, delivery: ShareDelivery, values: np.ndarray) -> MaskedInput:
        """Round 2: `values` (integers modulo 2**bits) plus the self mask plus +-pairwise masks with
        every neighbour that shared keys (the senders in `delivery`)."""
        self._expect(_Stage.MASK)
        modulus, length = self.config.modulus, self.config.vector_length
        masked = modulus.check(values, length)
        self._seed_shares, self._key_shares = self._open_delivery(delivery)
        masked = modulus.add(masked, expand_mask(self._self_seed, length, modulus))
        for peer in sorted(self._seed_shares):
            seed = pairwise_mask_seed(self._keys.mask, self._peers[peer].mask_public_key, self._session_id)
            pairwise = expand_mask(seed, length, modulus)
            masked = modulus.add_signed(masked, pairwise, pairwise_sign(self.client_id, peer))
        self._stage = _Stage.SIGN
        return MaskedInput.pack(self.client_id, modulus, masked)

    @_ends_session_on_error
    def sign_survivors(self, request: UnmaskRequest) -> SurvivorSignature:
        """Round 3 (consistency): check the request against this client's own view and sign it;
        nothing is revealed yet."""
        self._expect(_Stage.SIGN)
        check_unmask_request(
            self.client_id,
            self.config.threshold,
            self._peers.keys(),
            self._seed_shares.keys(),
            request.survivors,
            request.dropped,
        )
        self._request = request
        self._stage = _Stage.UNMASK
        payload = survivors_payload(self._session_id, request.survivors, request.dropped)
        return SurvivorSignature(self.client_id, self.identity.sign(payload))

    @_ends_session_on_error
    def unmask(self, signed: SignedSurvivors) -> UnmaskResponse:
        """Round 4: once at least `threshold` survivors signed the same request as this client,
        shares of survivors' self-mask seeds and of dropped clients' mask keys; answered once."""
        self._expect(_Stage.UNMASK)
        request = self._request
        survivors = set(request.survivors)
        payload = survivors_payload(self._session_id, request.survivors, request.dropped)
        signers = [s.client_id for s in signed.signatures]
        if len(set(signers)) != len(signers) or not set(signers) <= survivors:
            raise UnmaskRefusedError("the survivor signatures come from non-survivors or twice from one")
        for signature in signed.signatures[: self.config.threshold]:  # t valid ones suffice
            identity = self._peers[signature.client_id].identity_key
            self._check_identity(signature.client_id, identity)
            verify(identity, payload, signature.signature, f"client {signature.client_id}'s survivor list")
        if len(signers) < self.config.threshold:
            raise UnmaskRefusedError(
                f"only {len(signers)} survivors signed the survivor list, fewer than the threshold "
                f"{self.config.threshold}: others may have been shown another list"
            )
        self._stage = _Stage.DONE
        seeds_of = survivors & self._seed_shares.keys()
        keys_of = set(request.dropped) & self._key_shares.keys()
        return UnmaskResponse(
            self.client_id,
            tuple((peer, self._seed_shares[peer]) for peer in sorted(seeds_of)),
            tuple((peer, self._key_shares[peer]) for peer in sorted(keys_of)),
        )
