"""Whole secure-aggregation sessions in one process with real crypto, every message serialised and
parsed at each hop: the unmasked sum is exact, dropouts up to the threshold are survived and one
more fails clearly, clients refuse to unmask one peer twice over, tampered shares are rejected, and
the server refuses malformed protocol steps without losing the round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_session import (
    SEED,
    SESSION,
    plain_sum,
    quantised_inputs,
    seeded_clients,
    until_masking,
    until_unmasking,
    wire,
)

from fedprompt.common.secagg.client import SecAggClient
from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.errors import (
    ProtocolError,
    ShareDecryptionError,
    TooManyDropoutsError,
    UnmaskRefusedError,
)
from fedprompt.common.secagg.graph import neighbourhoods
from fedprompt.common.secagg.loopback import DropStage, run_loopback
from fedprompt.common.secagg.messages import (
    KeyAdvertisement,
    MaskedInput,
    Roster,
    ShareDelivery,
    UnmaskRequest,
)
from fedprompt.common.secagg.modulus import Modulus
from fedprompt.common.secagg.quantize import Quantizer
from fedprompt.common.secagg.server import SecAggServer
from fedprompt.common.secagg.shamir import PRIME


@pytest.mark.parametrize(("n", "threshold", "degree"), [(10, 6, None), (16, 4, 6)])
def test_unmasked_sum_is_the_exact_field_sum_and_the_float_sum_within_the_bound(n, threshold, degree) -> None:
    config = SecAggConfig(vector_length=512, threshold=threshold, degree=degree)
    quantizer = Quantizer(bound=1.0, max_clients=n, modulus_bits=config.modulus_bits)
    rng = np.random.default_rng(3)
    floats = {i: rng.normal(0.0, 0.2, config.vector_length) for i in range(n)}
    encoded = {i: quantizer.encode(x, rng) for i, x in floats.items()}

    run = run_loopback(config, encoded, SESSION, seed=SEED)

    assert run.result.survivors == tuple(range(n))
    np.testing.assert_array_equal(run.result.field_sum, plain_sum(config, encoded, range(n)))
    decoded = quantizer.decode(run.result.field_sum, n)
    error = np.abs(decoded - sum(np.clip(x, -1.0, 1.0) for x in floats.values())).max()
    assert error <= quantizer.error_bound(n, stochastic=True)
    shares_per_client = (n - 1) if degree is None else degree
    share_upload_bytes = run.bytes_up[0] - 4 * config.vector_length  # minus the packed masked input
    assert shares_per_client * 150 < share_upload_bytes < shares_per_client * 190 + 600


@pytest.mark.parametrize("stage", list(DropStage))
def test_survives_n_minus_1_minus_threshold_dropouts_at_any_stage(stage: DropStage) -> None:
    config = SecAggConfig(vector_length=64, threshold=3)
    ids = range(7)
    inputs = quantised_inputs(config, ids)
    dropouts = dict.fromkeys((1, 4, 6), stage)  # 7 - 1 - 3 = 3 dropouts are tolerated

    run = run_loopback(config, inputs, SESSION, dropouts, seed=SEED)

    # a client that uploaded and then vanished still counts: its input is in the sum
    expected = tuple(ids) if stage is DropStage.BEFORE_UNMASKING else (0, 2, 3, 5)
    assert run.result.survivors == expected
    np.testing.assert_array_equal(run.result.field_sum, plain_sum(config, inputs, expected))


def test_survives_dropouts_mixed_across_stages() -> None:
    config = SecAggConfig(vector_length=64, threshold=4)
    inputs = quantised_inputs(config, range(8))
    dropouts = {0: DropStage.BEFORE_SHARING, 3: DropStage.BEFORE_UPLOAD, 7: DropStage.BEFORE_UNMASKING}

    run = run_loopback(config, inputs, SESSION, dropouts, seed=SEED)

    assert run.result.survivors == (1, 2, 4, 5, 6, 7)
    np.testing.assert_array_equal(run.result.field_sum, plain_sum(config, inputs, (1, 2, 4, 5, 6, 7)))


@pytest.mark.parametrize("stage", list(DropStage))
def test_one_dropout_too_many_fails_with_a_clear_error(stage: DropStage) -> None:
    config = SecAggConfig(vector_length=64, threshold=3)
    inputs = quantised_inputs(config, range(7))
    with pytest.raises(TooManyDropoutsError, match="threshold 3"):
        run_loopback(config, inputs, SESSION, dict.fromkeys((1, 2, 4, 6), stage), seed=SEED)


def test_secagg_plus_graph_survives_dropouts_inside_every_neighbourhood() -> None:
    config = SecAggConfig(vector_length=64, threshold=3, degree=6)
    inputs = quantised_inputs(config, range(20))
    dropouts = {2: DropStage.BEFORE_UPLOAD, 9: DropStage.BEFORE_UPLOAD, 15: DropStage.BEFORE_UNMASKING}

    run = run_loopback(config, inputs, SESSION, dropouts, seed=SEED)

    survivors = tuple(i for i in range(20) if i not in (2, 9))
    assert run.result.survivors == survivors
    np.testing.assert_array_equal(run.result.field_sum, plain_sum(config, inputs, survivors))


def test_same_seeds_give_the_same_bytes_and_another_session_other_masks() -> None:
    config = SecAggConfig(vector_length=32, threshold=2)
    inputs = quantised_inputs(config, range(4))

    def masked_bytes(session: bytes) -> list[bytes]:
        clients, _, deliveries = until_masking(config, range(4), session)
        return [clients[i].mask(deliveries[i], inputs[i]).to_bytes() for i in range(4)]

    assert masked_bytes(SESSION) == masked_bytes(SESSION)
    assert all(a != b for a, b in zip(masked_bytes(SESSION), masked_bytes(b"another round"), strict=True))


def test_client_never_reveals_both_secrets_of_one_peer() -> None:
    config = SecAggConfig(vector_length=16, threshold=2)
    inputs = quantised_inputs(config, range(4))
    clients, _, request = until_unmasking(config, inputs)
    assert request == UnmaskRequest((0, 1, 2, 3), ())

    first = clients[0].unmask(request)
    assert [owner for owner, _ in first.self_seed_shares] == [1, 2, 3]
    assert first.mask_key_shares == ()
    assert clients[0].unmask(request) == first  # a repeated request (lost response) is answered alike

    lying = UnmaskRequest(survivors=(0, 1, 2), dropped=(3,))  # 3's seed share is out, now its key
    with pytest.raises(UnmaskRefusedError, match=r"other secret of clients \[3\]"):
        clients[0].unmask(lying)
    with pytest.raises(UnmaskRefusedError, match="both survived and dropped"):
        clients[1].unmask(UnmaskRequest(survivors=(0, 1, 2, 3), dropped=(3,)))
    assert clients[1].unmask(request).self_seed_shares  # a refusal reveals nothing and breaks nothing


def test_client_refuses_to_unmask_a_sum_of_fewer_than_threshold_clients() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)
    inputs = quantised_inputs(config, range(4))
    clients, _, _ = until_unmasking(config, inputs)
    with pytest.raises(UnmaskRefusedError, match="only 2 survivors"):
        clients[0].unmask(UnmaskRequest(survivors=(0, 1), dropped=(2, 3)))


def _tampered(delivery: ShareDelivery, **changes) -> ShareDelivery:
    first = dataclasses.replace(delivery.shares[0], **changes)
    return ShareDelivery(delivery.recipient, (first, *delivery.shares[1:]))


def test_tampered_or_misdirected_shares_are_rejected() -> None:
    config = SecAggConfig(vector_length=16, threshold=2)
    inputs = quantised_inputs(config, range(4))
    clients, _, deliveries = until_masking(config, range(4))
    delivery = deliveries[1]
    ciphertext = bytearray(delivery.shares[0].ciphertext)
    ciphertext[5] ^= 0x01
    nonce = bytes([delivery.shares[0].nonce[0] ^ 0x80]) + delivery.shares[0].nonce[1:]
    for bad in (_tampered(delivery, ciphertext=bytes(ciphertext)), _tampered(delivery, nonce=nonce)):
        with pytest.raises(ShareDecryptionError, match="failed authentication"):
            clients[1].mask(wire(bad), inputs[1])

    other = deliveries[2].shares[0]  # client 0's share for client 2, relabelled for client 1
    assert (other.sender, delivery.shares[0].sender) == (0, 0)
    relabelled = ShareDelivery(1, (dataclasses.replace(other, recipient=1), *delivery.shares[1:]))
    with pytest.raises(ShareDecryptionError):
        clients[1].mask(wire(relabelled), inputs[1])
    assert clients[1].mask(delivery, inputs[1]).client_id == 1  # the genuine delivery still works


def test_a_share_replayed_from_another_session_is_rejected() -> None:
    config = SecAggConfig(vector_length=16, threshold=2)
    inputs = quantised_inputs(config, range(3))
    # same seeds, so the same keys: only the session id differs
    clients, _, _ = until_masking(config, range(3), session=b"round 1")
    _, _, old_deliveries = until_masking(config, range(3), session=b"round 0")
    with pytest.raises(ShareDecryptionError):
        clients[0].mask(old_deliveries[0], inputs[0])


def test_server_refuses_bad_share_uploads() -> None:
    config = SecAggConfig(vector_length=16, threshold=2)
    clients = seeded_clients(config, range(4))
    server = SecAggServer(config, SESSION)
    for client in clients.values():
        server.add_advertisement(wire(client.advertise()))
    roster = wire(server.roster())
    upload = clients[0].share_keys(roster)
    for bad in (
        dataclasses.replace(upload, shares=upload.shares[1:]),  # a neighbour left out
        dataclasses.replace(upload, shares=(upload.shares[0], *upload.shares[:-1])),  # one twice
        dataclasses.replace(upload, sender=1),  # in another client's name
    ):
        with pytest.raises(ProtocolError):
            server.add_share_upload(wire(bad))
    server.add_share_upload(wire(upload))
    with pytest.raises(ProtocolError, match="uploaded already"):
        server.add_share_upload(wire(upload))


def test_client_refuses_a_roster_without_its_keys_or_with_an_unusable_key() -> None:
    config = SecAggConfig(vector_length=16, threshold=2)
    clients = [SecAggClient(i, config) for i in range(3)]
    advertisements = [client.advertise() for client in clients]
    with pytest.raises(ProtocolError, match="own public keys"):
        clients[0].share_keys(Roster(SESSION, tuple(advertisements[1:])))
    zero_key = dataclasses.replace(advertisements[2], share_public_key=bytes(32))  # a low-order point
    with pytest.raises(ProtocolError, match="unusable"):
        clients[0].share_keys(Roster(SESSION, (*advertisements[:2], zero_key)))


def test_server_refuses_bad_uploads_and_responses_and_the_round_goes_on() -> None:
    config = SecAggConfig(vector_length=16, threshold=2)
    inputs = quantised_inputs(config, range(4))
    clients, server, deliveries = until_masking(config, range(4))
    masked = {i: wire(clients[i].mask(deliveries[i], inputs[i])) for i in range(4)}
    for bad, reason in (
        (MaskedInput.pack(0, config.modulus, inputs[0][:8]), "sent 8 values"),
        (MaskedInput.pack(0, Modulus(16), inputs[0] % 256), r"2\*\*16"),
        (dataclasses.replace(masked[1], client_id=9), "client 9"),
    ):
        with pytest.raises(ProtocolError, match=reason):
            server.add_masked_input(wire(bad))
    server.add_masked_input(masked[0])
    with pytest.raises(ProtocolError, match="already"):
        server.add_masked_input(masked[0])
    with pytest.raises(ProtocolError, match="arrived while"):
        server.add_advertisement(KeyAdvertisement(5, bytes(32), bytes(32)))
    for i in (1, 2, 3):
        server.add_masked_input(masked[i])
    request = wire(server.unmask_request())

    response = clients[0].unmask(request)
    with pytest.raises(ProtocolError, match="not a survivor"):
        server.add_unmask_response(wire(dataclasses.replace(response, client_id=8)))
    not_asked = dataclasses.replace(response, mask_key_shares=response.self_seed_shares[:1])
    with pytest.raises(ProtocolError, match="not asked about"):
        server.add_unmask_response(wire(not_asked))
    for i in range(4):
        server.add_unmask_response(wire(clients[i].unmask(request)))
    np.testing.assert_array_equal(server.result().field_sum, plain_sum(config, inputs, range(4)))


def test_server_leaves_out_clients_whose_neighbourhood_fell_below_the_threshold() -> None:
    config = SecAggConfig(vector_length=32, threshold=4, degree=8)
    ids = range(24)
    graph = neighbourhoods(ids, config.degree, SESSION)
    gone = sorted(graph[0])[:5]  # client 0 keeps 3 of its 8 neighbours: too few to recover its secrets
    inputs = quantised_inputs(config, ids)

    run = run_loopback(config, inputs, SESSION, dict.fromkeys(gone, DropStage.BEFORE_SHARING), seed=SEED)

    survivors = run.result.survivors
    assert 0 not in survivors and not set(gone) & set(survivors)
    assert len(survivors) > 12
    assert all(len(graph[i] & set(survivors)) >= config.threshold for i in survivors)
    np.testing.assert_array_equal(run.result.field_sum, plain_sum(config, inputs, survivors))


def test_client_with_fewer_than_threshold_shares_does_not_upload() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)
    inputs = quantised_inputs(config, range(5))
    clients, _, deliveries = until_masking(config, range(5))
    starved = ShareDelivery(0, deliveries[0].shares[:2])
    with pytest.raises(ProtocolError, match="fewer than the threshold 3"):
        clients[0].mask(starved, inputs[0])


def test_server_detects_garbled_mask_key_shares_instead_of_returning_a_wrong_sum() -> None:
    config = SecAggConfig(vector_length=16, threshold=2)
    inputs = quantised_inputs(config, range(4))
    clients, server, deliveries = until_masking(config, range(4))
    for i in (0, 1, 2):  # client 3 drops before uploading
        server.add_masked_input(wire(clients[i].mask(deliveries[i], inputs[i])))
    request = wire(server.unmask_request())
    assert request.dropped == (3,)
    response = clients[0].unmask(request)
    (owner, y), *_ = response.mask_key_shares
    garbled = dataclasses.replace(response, mask_key_shares=((owner, (y + 1) % PRIME),))
    server.add_unmask_response(wire(garbled))
    for i in (1, 2):
        server.add_unmask_response(wire(clients[i].unmask(request)))
    with pytest.raises(ProtocolError, match=r"inconsistent|do not match"):
        server.result()


def test_client_masks_only_field_vectors_of_the_configured_length() -> None:
    config = SecAggConfig(vector_length=16, threshold=2, modulus_bits=16)
    clients, _, deliveries = until_masking(config, range(3))
    for bad, reason in (
        (np.zeros(15, dtype=np.uint64), "16 elements"),
        (np.full(16, 1 << 16, dtype=np.uint64), "outside"),
        (np.zeros(16), "dtype float64"),  # floats must go through Quantizer.encode first
    ):
        with pytest.raises(ValueError, match=reason):
            clients[0].mask(deliveries[0], bad)
