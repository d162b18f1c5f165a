"""The client half of secure aggregation: one `SecAggClient` per client per session (round).

Call in order: `advertise()`, `share_keys(roster)`, `mask(delivery, values)`, `unmask(request)`.
The input to `mask` is already quantised (`Quantizer.encode`) and, with client-level DP, already
noised: masking hides the noised update, the noise bounds what the sum reveals.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from fedprompt.common.secagg.config import MAX_CLIENT_ID, SecAggConfig
from fedprompt.common.secagg.errors import ProtocolError, UnmaskRefusedError
from fedprompt.common.secagg.graph import neighbourhoods
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
    UnmaskRequest,
    UnmaskResponse,
)
from fedprompt.common.secagg.prg import expand_mask, pairwise_sign
from fedprompt.common.secagg.randomness import SEED_BYTES, RandomBytes
from fedprompt.common.secagg.shamir import SHARE_BYTES, decode_share, encode_share, share_x, split


class _Stage(Enum):
    ADVERTISE = "advertise"
    SHARE_KEYS = "share_keys"
    MASK = "mask"
    UNMASK = "unmask"


class SecAggClient:
    """Masks one client's input so that only the sum over surviving clients can be unmasked."""

    def __init__(self, client_id: int, config: SecAggConfig, randomness: RandomBytes | None = None) -> None:
        if not 0 <= client_id <= MAX_CLIENT_ID:
            raise ValueError(f"client id must be in [0, {MAX_CLIENT_ID}], got {client_id}")
        self.client_id = client_id
        self.config = config
        self._random = randomness or RandomBytes()
        self._keys = SessionKeys.generate(self._random)
        self._stage = _Stage.ADVERTISE
        self._session_id = b""
        self._peers: dict[int, KeyAdvertisement] = {}
        self._neighbours: frozenset[int] = frozenset()
        self._self_seed = b""
        self._seed_shares: dict[int, int] = {}  # peer -> my share of the peer's self-mask seed
        self._key_shares: dict[int, int] = {}  # peer -> my share of the peer's mask private key
        self._revealed_seed_of: set[int] = set()
        self._revealed_key_of: set[int] = set()

    def _expect(self, stage: _Stage) -> None:
        if self._stage is not stage:
            raise ProtocolError(
                f"client {self.client_id}: the next step is {self._stage.value}, not {stage.value}"
            )

    def _own_advertisement(self) -> KeyAdvertisement:
        return KeyAdvertisement(self.client_id, public_bytes(self._keys.mask), public_bytes(self._keys.share))

    def advertise(self) -> KeyAdvertisement:
        """Round 0: this session's public keys."""
        self._expect(_Stage.ADVERTISE)
        self._stage = _Stage.SHARE_KEYS
        return self._own_advertisement()

    def share_keys(self, roster: Roster) -> ShareUpload:
        """Round 1: Shamir shares of the self-mask seed and the mask key, encrypted per neighbour."""
        self._expect(_Stage.SHARE_KEYS)
        peers = {a.client_id: a for a in roster.advertisements}
        if len(peers) != len(roster.advertisements):
            raise ProtocolError("the roster lists a client twice")
        if peers.get(self.client_id) != self._own_advertisement():
            raise ProtocolError(f"the roster does not carry client {self.client_id}'s own public keys")
        neighbours = neighbourhoods(peers, self.config.degree, roster.session_id)[self.client_id]
        if len(neighbours) < self.config.threshold:
            raise ProtocolError(
                f"client {self.client_id} has {len(neighbours)} neighbours, fewer than the threshold "
                f"{self.config.threshold}"
            )
        self._peers, self._neighbours, self._session_id = peers, neighbours, roster.session_id
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
        self._stage = _Stage.UNMASK
        return MaskedInput.pack(self.client_id, modulus, masked)

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Round 3: shares of survivors' self-mask seeds and of dropped clients' mask keys. Refuses
        any request that, with earlier ones, would reveal both secrets of one peer, and any request
        that would unmask a sum over fewer than `threshold` clients."""
        self._expect(_Stage.UNMASK)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            both = sorted(survivors & dropped)
            raise UnmaskRefusedError(f"clients {both} are listed as both survived and dropped")
        if len(survivors) < self.config.threshold:
            raise UnmaskRefusedError(
                f"only {len(survivors)} survivors, fewer than the threshold {self.config.threshold}: the sum "
                "would be too close to an individual input"
            )
        seeds_of = survivors & self._seed_shares.keys()
        keys_of = dropped & self._key_shares.keys()
        conflicts = (seeds_of & self._revealed_key_of) | (keys_of & self._revealed_seed_of)
        if conflicts:
            raise UnmaskRefusedError(
                f"client {self.client_id} already revealed the other secret of clients {sorted(conflicts)}; "
                "revealing both the self-mask seed and the mask key of a client would expose its input"
            )
        self._revealed_seed_of |= seeds_of
        self._revealed_key_of |= keys_of
        return UnmaskResponse(
            self.client_id,
            tuple((peer, self._seed_shares[peer]) for peer in sorted(seeds_of)),
            tuple((peer, self._key_shares[peer]) for peer in sorted(keys_of)),
        )
