"""Secure-aggregation messages survive the trip through bytes unchanged, and any malformed bytes
(truncated, extended, wrong kind, corrupted anywhere) give MessageFormatError and nothing else."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_session import quantised_inputs, seeded_clients, wire

from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.errors import MessageFormatError
from fedprompt.common.secagg.messages import KeyAdvertisement, MaskedInput, UnmaskRequest, UnmaskResponse
from fedprompt.common.secagg.server import SecAggServer
from fedprompt.common.secagg.shamir import PRIME

CONFIG = SecAggConfig(vector_length=24, threshold=3, modulus_bits=20)


def _one_of_each() -> list:
    """Every message kind, as a real session produces it."""
    inputs = quantised_inputs(CONFIG, range(4))
    clients = seeded_clients(CONFIG, range(4), b"session")
    server = SecAggServer(CONFIG, b"session")
    advertisements = [client.advertise() for client in clients.values()]
    for advertisement in advertisements:
        server.add_advertisement(advertisement)
    roster = server.roster()
    uploads = [client.share_keys(roster) for client in clients.values()]
    for upload in uploads:
        server.add_share_upload(upload)
    deliveries = server.deliveries()
    masked = [clients[i].mask(deliveries[i], inputs[i]) for i in range(4)]
    for message in masked:
        server.add_masked_input(message)
    request = server.unmask_request()
    signatures = [client.sign_survivors(request) for client in clients.values()]
    for signature in signatures:
        server.add_survivor_signature(signature)
    signed = server.signed_survivors()
    response = clients[0].unmask(signed)
    share = uploads[0].shares[0]
    return [
        advertisements[0],
        roster,
        share,
        uploads[0],
        deliveries[1],
        masked[0],
        request,
        signatures[0],
        signed,
        response,
    ]


MESSAGES = _one_of_each()


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message) -> None:
    assert wire(message) == message


def test_share_values_up_to_the_prime_round_trip() -> None:
    response = UnmaskResponse(7, ((1, PRIME - 1), (2, 0)), ((3, 12345),))
    assert wire(response) == response


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_truncated_extended_or_mislabelled_bytes_are_refused(message) -> None:
    data = message.to_bytes()
    for cut in range(len(data)):
        with pytest.raises(MessageFormatError):
            type(message).from_bytes(data[:cut])
    with pytest.raises(MessageFormatError, match="trailing"):
        type(message).from_bytes(data + b"\0")
    other = UnmaskRequest if not isinstance(message, UnmaskRequest) else KeyAdvertisement
    with pytest.raises(MessageFormatError, match="expected"):
        other.from_bytes(data)


def test_masked_input_with_values_beyond_the_modulus_is_refused() -> None:
    too_big = MaskedInput(0, 20, np.array([1 << 20], dtype="<u4").tobytes())
    with pytest.raises(MessageFormatError, match="outside"):
        MaskedInput.from_bytes(too_big.to_bytes())
    with pytest.raises(MessageFormatError, match="modulus"):
        MaskedInput.from_bytes(MaskedInput(0, 70, b"").to_bytes())


def test_a_huge_claimed_list_is_refused_before_allocating() -> None:
    data = bytearray(UnmaskRequest((), ()).to_bytes())
    data[6:10] = (2**32 - 1).to_bytes(4, "big")
    with pytest.raises(MessageFormatError, match="more than its bytes"):
        UnmaskRequest.from_bytes(bytes(data))


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, len(MESSAGES) - 1),
    position=st.integers(0, 10_000),
    replacement=st.binary(min_size=1, max_size=8),
)
def test_corrupted_messages_parse_or_raise_only_message_format_error(index, position, replacement) -> None:
    data = bytearray(MESSAGES[index].to_bytes())
    position %= len(data)
    data[position : position + len(replacement)] = replacement
    for kind in (type(MESSAGES[index]), type(MESSAGES[(index + 1) % len(MESSAGES)])):
        try:
            parsed = kind.from_bytes(bytes(data))
        except MessageFormatError:
            continue
        assert parsed.to_bytes() == bytes(data)  # what parses is exactly what was sent
