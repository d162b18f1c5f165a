"""Tensors <-> wire messages, and byte payloads <-> chunks.

Both ends of the wire use this one codec. Decoding is strict because its input comes from the
network: every way a message can be malformed (unknown encoding or dtype, a shape that does not
match the byte length, NaN/Inf, duplicate names, garbage bytes, too large) raises `CodecError`
with one readable sentence, never another exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from google.protobuf.message import DecodeError

from protos import fedprompt_pb2 as pb

ENCODINGS: dict[str, int] = {"fp32": pb.FP32, "fp16": pb.FP16, "int8": pb.INT8}
"""Names accepted in configs and on the command line, mapped to the wire enum."""

_WIRE_DTYPES: dict[int, np.dtype] = {
    pb.FP32: np.dtype("<f4"),
    pb.FP16: np.dtype("<f2"),
    pb.INT8: np.dtype("i1"),
}
_SOURCE_DTYPES: frozenset[str] = frozenset({"float32", "float16", "float64"})
DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024
"""Decoded tensors larger than this are refused before any allocation (256 MiB of float32)."""


class CodecError(ValueError):
    """A tensor or payload that cannot be encoded or decoded; the message says why."""


def encode_tensor(name: str, array: np.ndarray, encoding: str = "fp32") -> pb.Tensor:
    """One floating-point array as a wire tensor; int8 uses one symmetric scale per tensor."""
    if encoding not in ENCODINGS:
        raise CodecError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    array = np.asarray(array)
    if array.dtype.name not in _SOURCE_DTYPES:
        raise CodecError(f"tensor {name!r}: dtype {array.dtype} is not a float dtype")
    if not np.isfinite(array).all():
        raise CodecError(f"tensor {name!r} contains NaN or Inf")
    wire = ENCODINGS[encoding]
    scale = 0.0
    if wire == pb.INT8:
        peak = float(np.abs(array).max()) if array.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        values = np.clip(np.rint(array / scale), -127, 127).astype(_WIRE_DTYPES[wire])
    else:
        with np.errstate(over="ignore"):
            values = array.astype(_WIRE_DTYPES[wire])
        if not np.isfinite(values).all():
            raise CodecError(f"tensor {name!r} overflows {encoding}")
    return pb.Tensor(
        name=name,
        dtype=array.dtype.name,
        shape=list(array.shape),
        encoding=wire,
        data=values.tobytes(),
        scale=scale,
    )


def decode_tensor(message: pb.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """A wire tensor back to an array of its original dtype, after checking everything."""
    label = f"tensor {message.name!r}"
    if message.encoding not in _WIRE_DTYPES:
        raise CodecError(f"{label}: unknown encoding {message.encoding}")
    if message.dtype not in _SOURCE_DTYPES:
        raise CodecError(f"{label}: unsupported dtype {message.dtype!r}")
    shape = tuple(message.shape)
    if any(dim < 0 for dim in shape):
        raise CodecError(f"{label}: negative dimension in shape {shape}")
    count = math.prod(shape)
    if count > max_elements:
        raise CodecError(f"{label}: {count} elements exceed the limit of {max_elements}")
    wire_dtype = _WIRE_DTYPES[message.encoding]
    if len(message.data) != count * wire_dtype.itemsize:
        raise CodecError(
            f"{label}: {len(message.data)} bytes do not match shape {shape} "
            f"({count * wire_dtype.itemsize} bytes expected)"
        )
    values = np.frombuffer(message.data, dtype=wire_dtype).reshape(shape)
    if message.encoding == pb.INT8:
        if not (math.isfinite(message.scale) and message.scale > 0):
            raise CodecError(f"{label}: int8 scale must be a positive finite number, got {message.scale}")
        values = values.astype(np.float64) * message.scale
    with np.errstate(over="ignore", invalid="ignore"):
        result = values.astype(np.dtype(message.dtype))
    if not np.isfinite(result).all():
        raise CodecError(f"{label} contains NaN or Inf")
    return result


def encode_tensor_set(tensors: Mapping[str, np.ndarray], encoding: str = "fp32") -> bytes:
    """A named set of arrays as the serialized payload that tasks, updates and models carry."""
    return pb.TensorSet(
        tensors=[encode_tensor(name, array, encoding) for name, array in tensors.items()]
    ).SerializeToString()


def decode_tensor_set(payload: bytes, max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, np.ndarray]:
    """The inverse of `encode_tensor_set`; `max_elements` bounds the whole set."""
    message = pb.TensorSet()
    try:
        message.ParseFromString(payload)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise CodecError(f"payload is not a valid tensor set ({error})") from None
    result: dict[str, np.ndarray] = {}
    budget = max_elements
    for tensor in message.tensors:
        if not tensor.name:
            raise CodecError("a tensor has no name")
        if tensor.name in result:
            raise CodecError(f"tensor {tensor.name!r} appears twice")
        result[tensor.name] = decode_tensor(tensor, budget)
        budget -= result[tensor.name].size
    return result


def iter_chunks(payload: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Cuts a payload into pieces of at most `chunk_bytes` (none for an empty payload)."""
    if chunk_bytes <= 0:
        raise CodecError("chunk size must be positive")
    for start in range(0, len(payload), chunk_bytes):
        yield payload[start : start + chunk_bytes]


def join_chunks(chunks: Iterable[bytes], expected_bytes: int, max_bytes: int) -> bytes:
    """Reassembles chunks, refusing a payload over `max_bytes` as soon as it gets there, and one
    whose length differs from what its header announced."""
    if expected_bytes > max_bytes:
        raise CodecError(f"payload of {expected_bytes} bytes exceeds the limit of {max_bytes} bytes")
    parts: list[bytes] = []
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if received > expected_bytes:
            raise CodecError(f"payload is longer than the {expected_bytes} bytes its header announced")
        parts.append(chunk)
    if received != expected_bytes:
        raise CodecError(f"payload ended after {received} of {expected_bytes} announced bytes")
    return b"".join(parts)
