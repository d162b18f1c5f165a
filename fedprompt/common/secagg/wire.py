"""A small strict binary framing for secure-aggregation messages, so they fit protobuf `bytes` fields.

A frame is magic "FPSA", a version byte, a message-kind byte and the fields in order: unsigned
big-endian integers, fixed-size byte strings, and length-prefixed byte strings and lists. The
reader raises MessageFormatError on anything else (wrong kind, truncation, trailing bytes), and
refuses list lengths that the remaining bytes could not hold, before allocating anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fedprompt.common.secagg.errors import MessageFormatError

MAGIC = b"FPSA"
VERSION = 1
T = TypeVar("T")


class Writer:
    def __init__(self, kind: int) -> None:
        self._parts: list[bytes] = [MAGIC, bytes([VERSION, kind])]

    def uint(self, value: int, size: int) -> Writer:
        self._parts.append(value.to_bytes(size, "big"))
        return self

    def fixed(self, data: bytes, size: int) -> Writer:
        if len(data) != size:
            raise ValueError(f"field must be {size} bytes, got {len(data)}")
        self._parts.append(data)
        return self

    def blob(self, data: bytes) -> Writer:
        return self.uint(len(data), 4).fixed(data, len(data))

    def items(self, items: tuple[T, ...], write: Callable[[Writer, T], object]) -> Writer:
        self.uint(len(items), 4)
        for item in items:
            write(self, item)
        return self

    def finish(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    def __init__(self, data: bytes, kind: int, name: str) -> None:
        self._data = memoryview(bytes(data))
        self._offset = 0
        self._name = name
        if bytes(self._take(len(MAGIC))) != MAGIC:
            raise MessageFormatError(f"not a secure-aggregation message (expected {name})")
        version, found = self._take(2)
        if version != VERSION:
            raise MessageFormatError(f"{name}: unsupported version {version}")
        if found != kind:
            raise MessageFormatError(f"expected {name} (kind {kind}), got message kind {found}")

    def _take(self, size: int) -> memoryview:
        if self._offset + size > len(self._data):
            raise MessageFormatError(f"{self._name} is truncated")
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self._take(size), "big")

    def fixed(self, size: int) -> bytes:
        return bytes(self._take(size))

    def blob(self) -> bytes:
        return self.fixed(self.uint(4))

    def items(self, read: Callable[[Reader], T], min_item_bytes: int) -> tuple[T, ...]:
        count = self.uint(4)
        if count * min_item_bytes > len(self._data) - self._offset:
            raise MessageFormatError(f"{self._name} claims {count} items, more than its bytes can hold")
        return tuple(read(self) for _ in range(count))

    def done(self) -> None:
        if self._offset != len(self._data):
            raise MessageFormatError(f"{self._name} has {len(self._data) - self._offset} trailing bytes")
