"""The protocol's messages: frozen dataclasses of ints and bytes, each with `to_bytes`/`from_bytes`.

Round 0  client -> server  KeyAdvertisement   two X25519 public keys, signed with the device's
                                              long-term Ed25519 key (`identity`)
         server -> all     Roster             session id + every advertisement
Round 1  client -> server  ShareUpload        one EncryptedShare per neighbour
         server -> client  ShareDelivery      the EncryptedShares addressed to that client
Round 2  client -> server  MaskedInput        quantised input + masks, modulo 2**bits
Round 3  server -> all     UnmaskRequest      who survived (uploaded) and who dropped
         client -> server  SurvivorSignature  its signature of that request (consistency round)
Round 4  server -> all     SignedSurvivors    the survivors' signatures of the request
         client -> server  UnmaskResponse     self-seed shares of survivors, mask-key shares of dropped
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np

from fedprompt.common.secagg.errors import MessageFormatError
from fedprompt.common.secagg.identity import IDENTITY_KEY_BYTES, SIGNATURE_BYTES
from fedprompt.common.secagg.keys import KEY_BYTES, NONCE_BYTES
from fedprompt.common.secagg.modulus import MAX_BITS, MIN_BITS, Modulus
from fedprompt.common.secagg.shamir import SHARE_BYTES, decode_share, encode_share
from fedprompt.common.secagg.wire import Reader, Writer

ID_BYTES = 4
ShareOf = tuple[int, int]
"""(owner client id, share value): a share of the owner's secret held by the message's sender."""


class _Message:
    KIND: ClassVar[int]

    def _write(self, writer: Writer) -> None:
        raise NotImplementedError

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        writer = Writer(self.KIND)
        self._write(writer)
        return writer.finish()

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Parse untrusted bytes; any malformation raises MessageFormatError."""
        reader = Reader(data, cls.KIND, cls.__name__)
        message = cls._read(reader)
        reader.done()
        return message


def _write_ids(writer: Writer, ids: tuple[int, ...]) -> None:
    writer.items(ids, lambda w, i: w.uint(i, ID_BYTES))


def _read_ids(reader: Reader) -> tuple[int, ...]:
    return reader.items(lambda r: r.uint(ID_BYTES), ID_BYTES)


def _write_shares_of(writer: Writer, shares: tuple[ShareOf, ...]) -> None:
    writer.items(shares, lambda w, s: w.uint(s[0], ID_BYTES).fixed(encode_share(s[1]), SHARE_BYTES))


def _read_shares_of(reader: Reader) -> tuple[ShareOf, ...]:
    return reader.items(
        lambda r: (r.uint(ID_BYTES), decode_share(r.fixed(SHARE_BYTES))), ID_BYTES + SHARE_BYTES
    )


@dataclass(frozen=True)
class KeyAdvertisement(_Message):
    KIND: ClassVar[int] = 1
    client_id: int
    mask_public_key: bytes
    share_public_key: bytes
    identity_key: bytes
    signature: bytes  # by identity_key, of identity.advertisement_payload

    def _write(self, writer: Writer) -> None:
        writer.uint(self.client_id, ID_BYTES).fixed(self.mask_public_key, KEY_BYTES)
        writer.fixed(self.share_public_key, KEY_BYTES).fixed(self.identity_key, IDENTITY_KEY_BYTES)
        writer.fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(
            reader.uint(ID_BYTES),
            reader.fixed(KEY_BYTES),
            reader.fixed(KEY_BYTES),
            reader.fixed(IDENTITY_KEY_BYTES),
            reader.fixed(SIGNATURE_BYTES),
        )


_ADVERTISEMENT_BYTES = ID_BYTES + 2 * KEY_BYTES + IDENTITY_KEY_BYTES + SIGNATURE_BYTES


@dataclass(frozen=True)
class Roster(_Message):
    KIND: ClassVar[int] = 2
    session_id: bytes
    advertisements: tuple[KeyAdvertisement, ...]

    @property
    def graph_seed(self) -> bytes:
        """What the SecAgg+ neighbour graph is drawn from: the session id and every member's fresh
        session keys, which the clients chose after the aggregator chose the session id, so the
        aggregator cannot pick the graph by choosing session ids (only by leaving clients out)."""
        digest = hashlib.sha256(b"fedprompt-secagg-v1/graph-seed" + len(self.session_id).to_bytes(4, "big"))
        digest.update(self.session_id)
        for ad in sorted(self.advertisements, key=lambda a: a.client_id):
            digest.update(ad.client_id.to_bytes(ID_BYTES, "big") + ad.mask_public_key + ad.share_public_key)
        return digest.digest()

    def _write(self, writer: Writer) -> None:
        writer.blob(self.session_id).items(self.advertisements, lambda w, a: a._write(w))

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.blob(), reader.items(KeyAdvertisement._read, _ADVERTISEMENT_BYTES))


@dataclass(frozen=True)
class EncryptedShare(_Message):
    """The sender's shares of its self-mask seed and of its mask private key, for `recipient` only."""

    KIND: ClassVar[int] = 3
    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes

    def _write(self, writer: Writer) -> None:
        writer.uint(self.sender, ID_BYTES).uint(self.recipient, ID_BYTES)
        writer.fixed(self.nonce, NONCE_BYTES).blob(self.ciphertext)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.uint(ID_BYTES), reader.uint(ID_BYTES), reader.fixed(NONCE_BYTES), reader.blob())


_MIN_ENCRYPTED_SHARE = 2 * ID_BYTES + NONCE_BYTES + 4


@dataclass(frozen=True)
class ShareUpload(_Message):
    KIND: ClassVar[int] = 4
    sender: int
    shares: tuple[EncryptedShare, ...]

    def _write(self, writer: Writer) -> None:
        writer.uint(self.sender, ID_BYTES).items(self.shares, lambda w, s: s._write(w))

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.uint(ID_BYTES), reader.items(EncryptedShare._read, _MIN_ENCRYPTED_SHARE))


@dataclass(frozen=True)
class ShareDelivery(_Message):
    KIND: ClassVar[int] = 5
    recipient: int
    shares: tuple[EncryptedShare, ...]

    def _write(self, writer: Writer) -> None:
        writer.uint(self.recipient, ID_BYTES).items(self.shares, lambda w, s: s._write(w))

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.uint(ID_BYTES), reader.items(EncryptedShare._read, _MIN_ENCRYPTED_SHARE))


@dataclass(frozen=True)
class MaskedInput(_Message):
    """A client's masked vector, packed little-endian at the modulus' element width."""

    KIND: ClassVar[int] = 6
    client_id: int
    modulus_bits: int
    data: bytes

    @classmethod
    def pack(cls, client_id: int, modulus: Modulus, values: np.ndarray) -> MaskedInput:
        return cls(client_id, modulus.bits, modulus.pack(values))

    def values(self) -> np.ndarray:
        return Modulus(self.modulus_bits).unpack(self.data)

    def _write(self, writer: Writer) -> None:
        writer.uint(self.client_id, ID_BYTES).uint(self.modulus_bits, 1).blob(self.data)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        message = cls(reader.uint(ID_BYTES), reader.uint(1), reader.blob())
        if not MIN_BITS <= message.modulus_bits <= MAX_BITS:
            raise MessageFormatError(f"MaskedInput: unsupported modulus 2**{message.modulus_bits}")
        message.values()  # validates the packing and the range
        return message


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Broadcast to all survivors: each answers only for the neighbours whose shares it holds."""

    KIND: ClassVar[int] = 7
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def _write(self, writer: Writer) -> None:
        _write_ids(writer, self.survivors)
        _write_ids(writer, self.dropped)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(_read_ids(reader), _read_ids(reader))


@dataclass(frozen=True)
class SurvivorSignature(_Message):
    """A survivor's signature of the unmask request it was sent (`identity.survivors_payload`)."""

    KIND: ClassVar[int] = 9
    client_id: int
    signature: bytes

    def _write(self, writer: Writer) -> None:
        writer.uint(self.client_id, ID_BYTES).fixed(self.signature, SIGNATURE_BYTES)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.uint(ID_BYTES), reader.fixed(SIGNATURE_BYTES))


@dataclass(frozen=True)
class SignedSurvivors(_Message):
    """Every survivor signature the server collected; each client checks them before unmasking."""

    KIND: ClassVar[int] = 10
    signatures: tuple[SurvivorSignature, ...]

    def _write(self, writer: Writer) -> None:
        writer.items(self.signatures, lambda w, s: s._write(w))

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.items(SurvivorSignature._read, ID_BYTES + SIGNATURE_BYTES))


@dataclass(frozen=True)
class UnmaskResponse(_Message):
    KIND: ClassVar[int] = 8
    client_id: int
    self_seed_shares: tuple[ShareOf, ...]
    mask_key_shares: tuple[ShareOf, ...]

    def _write(self, writer: Writer) -> None:
        writer.uint(self.client_id, ID_BYTES)
        _write_shares_of(writer, self.self_seed_shares)
        _write_shares_of(writer, self.mask_key_shares)

    @classmethod
    def _read(cls, reader: Reader) -> Self:
        return cls(reader.uint(ID_BYTES), _read_shares_of(reader), _read_shares_of(reader))
