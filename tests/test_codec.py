"""The tensor wire codec: exact or bounded round trips, and a decoder that rejects every kind of
malformed input with CodecError instead of crashing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedprompt.common.codec import (
    CodecError,
    decode_tensor,
    decode_tensor_set,
    encode_tensor,
    encode_tensor_set,
    iter_chunks,
    join_chunks,
)
from protos import fedprompt_pb2 as pb

RNG = np.random.default_rng(0)


def test_fp32_round_trip_is_exact() -> None:
    ctx = RNG.normal(0, 0.02, size=(16, 512)).astype(np.float32)
    decoded = decode_tensor_set(encode_tensor_set({"ctx": ctx, "bias": np.zeros(3, np.float32)}, "fp32"))
    assert decoded["ctx"].dtype == np.float32
    np.testing.assert_array_equal(decoded["ctx"], ctx)
    np.testing.assert_array_equal(decoded["bias"], np.zeros(3))


def test_fp16_round_trip_halves_the_bytes_within_half_precision() -> None:
    ctx = RNG.normal(0, 0.02, size=(16, 512)).astype(np.float32)
    message = encode_tensor("ctx", ctx, "fp16")
    assert len(message.data) == 16 * 512 * 2  # the 16 KB PromptFL update
    decoded = decode_tensor(message)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, ctx, rtol=1e-3, atol=1e-7)


def test_int8_round_trip_error_is_at_most_half_a_step() -> None:
    ctx = RNG.normal(0, 1.0, size=(8, 64)).astype(np.float32)
    message = encode_tensor("ctx", ctx, "int8")
    assert len(message.data) == ctx.size
    step = np.abs(ctx).max() / 127
    assert np.abs(decode_tensor(message) - ctx).max() <= step / 2 + 1e-6


def test_int8_of_all_zeros_decodes_to_zeros() -> None:
    np.testing.assert_array_equal(decode_tensor(encode_tensor("z", np.zeros((2, 2), np.float32), "int8")), 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encoder_refuses_non_finite_values(bad: float) -> None:
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_tensor("x", np.array([1.0, bad], np.float32))


def test_encoder_refuses_fp16_overflow_and_unknown_encoding() -> None:
    with pytest.raises(CodecError, match="overflows"):
        encode_tensor("x", np.array([1e6], np.float32), "fp16")
    with pytest.raises(CodecError, match="unknown encoding"):
        encode_tensor("x", np.zeros(1, np.float32), "bf16")


def valid() -> pb.Tensor:
    return encode_tensor("ctx", np.ones((2, 3), np.float32), "fp32")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t.ClearField("shape") or t.shape.extend([2, 4]), "do not match shape"),
        (lambda t: setattr(t, "data", t.data[:-1]), "do not match shape"),
        (lambda t: t.ClearField("shape") or t.shape.extend([-2, -3]), "negative dimension"),
        (lambda t: setattr(t, "dtype", "int64"), "unsupported dtype"),
        (lambda t: setattr(t, "encoding", 0), "unknown encoding"),
        (lambda t: setattr(t, "data", np.array([np.nan] * 6, np.float32).tobytes()), "NaN or Inf"),
        (lambda t: t.ClearField("shape") or t.shape.extend([1 << 40]), "exceed the limit"),
    ],
)
def test_decoder_names_what_is_wrong(mutate, reason: str) -> None:
    message = valid()
    mutate(message)
    with pytest.raises(CodecError, match=reason):
        decode_tensor(message)


def test_int8_with_a_bad_scale_is_refused() -> None:
    message = encode_tensor("q", np.ones(4, np.float32), "int8")
    message.scale = float("nan")
    with pytest.raises(CodecError, match="scale"):
        decode_tensor(message)


def test_tensor_set_refuses_duplicates_unnamed_and_garbage() -> None:
    twice = pb.TensorSet(tensors=[valid(), valid()]).SerializeToString()
    with pytest.raises(CodecError, match="appears twice"):
        decode_tensor_set(twice)
    unnamed = valid()
    unnamed.name = ""
    with pytest.raises(CodecError, match="no name"):
        decode_tensor_set(pb.TensorSet(tensors=[unnamed]).SerializeToString())
    with pytest.raises(CodecError, match="not a valid tensor set"):
        decode_tensor_set(b"\xff\xff\xff\xff")


def test_the_element_budget_covers_the_whole_set() -> None:
    payload = encode_tensor_set({"a": np.zeros(6, np.float32), "b": np.zeros(6, np.float32)})
    assert len(decode_tensor_set(payload, max_elements=12)) == 2
    with pytest.raises(CodecError, match="exceed the limit"):
        decode_tensor_set(payload, max_elements=11)


def test_chunks_reassemble_and_lengths_are_enforced() -> None:
    payload = bytes(range(256)) * 10
    chunks = list(iter_chunks(payload, 1000))
    assert [len(c) for c in chunks] == [1000, 1000, 560]
    assert join_chunks(chunks, len(payload), max_bytes=4096) == payload
    with pytest.raises(CodecError, match="exceeds the limit"):
        join_chunks(chunks, len(payload), max_bytes=2000)
    with pytest.raises(CodecError, match="ended after"):
        join_chunks(chunks[:2], len(payload), max_bytes=4096)
    with pytest.raises(CodecError, match="longer than"):
        join_chunks(chunks, 2000, max_bytes=4096)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_never_crashes_on_garbage_bytes(garbage: bytes) -> None:
    try:
        decoded = decode_tensor_set(garbage, max_elements=1 << 16)
    except CodecError:
        return
    assert all(np.isfinite(a).all() for a in decoded.values())


@settings(max_examples=300, deadline=None)
@given(
    name=st.text(max_size=8),
    dtype=st.sampled_from(["float32", "float16", "float64", "int8", "", "complex64"]),
    shape=st.lists(st.integers(min_value=-3, max_value=1 << 33), max_size=4),
    encoding=st.integers(min_value=0, max_value=5),
    data=st.binary(max_size=64),
    scale=st.floats(allow_nan=True, allow_infinity=True),
)
def test_decoder_never_crashes_on_structured_garbage(name, dtype, shape, encoding, data, scale) -> None:
    message = pb.Tensor(name=name, dtype=dtype, shape=shape, encoding=encoding, data=data, scale=scale)
    try:
        decoded = decode_tensor_set(pb.TensorSet(tensors=[message]).SerializeToString(), max_elements=1 << 16)
    except CodecError:
        return
    assert all(np.isfinite(a).all() for a in decoded.values())
