"""A trained update kept on disk until the aggregator has answered for it.

Training a round costs time and, under local DP, privacy budget (spent before training starts).
So the client saves its encoded update before the first upload attempt and deletes it only when
it is accepted or the aggregator has moved on to another round. A client restarted after a crash,
or one that could not reach the aggregator before the deadline, uploads the saved update when it
is offered the same round again instead of training, and spending budget, a second time. A
refused update is kept too, with the refusal beside it (`pending-update.refused`): the device
sits that round out instead of training for it again.

File layout: 4-byte big-endian length of the header, the serialized `UpdateHeader` (no session),
then the payload; the header's `payload_bytes` catches a truncated file.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from fedprompt.common.files import write_atomically
from protos import fedprompt_pb2 as pb

log = logging.getLogger("fedprompt.client")
PENDING_FILE = "pending-update.bin"
REFUSAL_FILE = "pending-update.refused"
TRAINING_FILE = "training-round"
_LENGTH = struct.Struct(">I")


@dataclass(frozen=True)
class PendingUpload:
    """One round's update as it will be sent, minus the session credential."""

    header: pb.UpdateHeader
    payload: bytes
    refusal: str | None = None  # why the aggregator refused it, once it has

    @property
    def round_id(self) -> int:
        return self.header.round_id

    def answers(self, run_id: str, round_id: int) -> bool:
        return (self.header.run_id, self.header.round_id) == (run_id, round_id)


class PendingUploadFile:
    """The one pending update of a client state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / PENDING_FILE
        self._spent = self.path.with_name(PENDING_FILE + ".spent")
        self.refusal_path = Path(state_dir) / REFUSAL_FILE
        self.training_path = Path(state_dir) / TRAINING_FILE

    def mark_spent(self) -> None:
        """Its masked input is about to leave in a secure session: it must never be summed again."""
        write_atomically(self._spent, b"")

    def spent(self) -> bool:
        return self._spent.exists()

    def save(self, upload: PendingUpload) -> None:
        self._spent.unlink(missing_ok=True)
        header = upload.header.SerializeToString()
        self.refusal_path.unlink(missing_ok=True)
        write_atomically(self.path, _LENGTH.pack(len(header)) + header + upload.payload)
        self.training_path.unlink(missing_ok=True)

    def mark_training(self, run_id: str, round_id: int) -> bool:
        """Note that training for this round starts (until `save`); True if a training of the same
        round was already noted: it was interrupted (the device was killed), and its privacy cost,
        counted before it started, is paid again by this one."""
        mark = f"{run_id} {round_id}"
        try:
            interrupted = self.training_path.read_text() == mark
        except FileNotFoundError:
            interrupted = False
        write_atomically(self.training_path, mark.encode())
        return interrupted

    def mark_refused(self, reason: str) -> None:
        """Keep the saved update, marked as refused for `reason`."""
        write_atomically(self.refusal_path, reason.encode())

    def load(self) -> PendingUpload | None:
        """The saved update, or None; an unreadable file is dropped with a warning."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            (length,) = _LENGTH.unpack_from(data)
            header = pb.UpdateHeader.FromString(data[_LENGTH.size : _LENGTH.size + length])
            payload = data[_LENGTH.size + length :]
            if len(payload) != header.payload_bytes:
                raise ValueError(f"{len(payload)} of {header.payload_bytes} payload bytes")
        except (struct.error, DecodeError, ValueError) as error:
            log.warning("unsent update %s is unreadable (%s); dropping it", self.path, error)
            self.clear()
            return None
        try:
            refusal = self.refusal_path.read_text(errors="replace")
        except FileNotFoundError:
            refusal = None
        return PendingUpload(header, payload, refusal)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._spent.unlink(missing_ok=True)
        self.refusal_path.unlink(missing_ok=True)
