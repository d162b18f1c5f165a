"""Whole secure-aggregation sessions in one process with real crypto, every message serialised and
parsed at each hop: the unmasked sum is exact, dropouts up to the threshold are survived and one
more fails clearly, clients reveal shares once and only after enough survivors signed the same
request, tampered shares and unsigned keys are rejected, and
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
    roster_graph,
    seeded_clients,
    until_masking,
    until_signed,
    until_unmasking,
    wire,
)

from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.errors import (
    ProtocolError,
    RefusedError,
    ShareDecryptionError,
    TooManyDropoutsError,
    UnmaskRefusedError,
)
from fedprompt.common.secagg.identity import advertisement_payload, survivors_payload
from fedprompt.common.secagg.loopback import DropStage, enrolled_clients, run_loopback
from fedprompt.common.secagg.messages import (
    KeyAdvertisement,
    MaskedInput,
    Roster,
    ShareDelivery,
    SignedSurvivors,
    SurvivorSignature,
    UnmaskRequest,
)
from fedprompt.common.secagg.modulus import Modulus
from fedprompt.common.secagg.policy import ThresholdFloor
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
    # + 800: the signed advertisement, the survivor signature and the unmask response's framing
    assert shares_per_client * 150 < share_upload_bytes < shares_per_client * 190 + 800


@pytest.mark.parametrize("stage", list(DropStage))
def test_survives_n_minus_1_minus_threshold_dropouts_at_any_stage(stage: DropStage) -> None:
    config = SecAggConfig(vector_length=64, threshold=5)
    ids = range(9)
    inputs = quantised_inputs(config, ids)
    dropouts = dict.fromkeys((1, 4, 6), stage)  # 9 - 1 - 5 = 3 dropouts are tolerated

    run = run_loopback(config, inputs, SESSION, dropouts, seed=SEED)

    # a client that uploaded and then vanished still counts: its input is in the sum
    uploaded = stage in (DropStage.BEFORE_SIGNING, DropStage.BEFORE_UNMASKING)
    expected = tuple(ids) if uploaded else (0, 2, 3, 5, 7, 8)
    assert run.result.survivors == expected
    np.testing.assert_array_equal(run.result.field_sum, plain_sum(config, inputs, expected))


def test_survives_dropouts_mixed_across_stages() -> None:
    config = SecAggConfig(vector_length=64, threshold=5)
    inputs = quantised_inputs(config, range(9))
    dropouts = {0: DropStage.BEFORE_SHARING, 3: DropStage.BEFORE_UPLOAD, 7: DropStage.BEFORE_UNMASKING}

    run = run_loopback(config, inputs, SESSION, dropouts, seed=SEED)

    assert run.result.survivors == (1, 2, 4, 5, 6, 7, 8)
    np.testing.assert_array_equal(run.result.field_sum, plain_sum(config, inputs, (1, 2, 4, 5, 6, 7, 8)))


@pytest.mark.parametrize("stage", list(DropStage))
def test_one_dropout_too_many_fails_with_a_clear_error(stage: DropStage) -> None:
    config = SecAggConfig(vector_length=64, threshold=4)
    inputs = quantised_inputs(config, range(7))
    with pytest.raises(TooManyDropoutsError, match="threshold 4"):
        run_loopback(config, inputs, SESSION, dict.fromkeys((1, 2, 4), stage), seed=SEED)


def test_secagg_plus_graph_survives_dropouts_inside_every_neighbourhood() -> None:
    config = SecAggConfig(vector_length=64, threshold=4, degree=6)
    inputs = quantised_inputs(config, range(20))
    graph = roster_graph(config, range(20))
    # three clients of which no survivor has more than 6 - 4 = 2 as neighbours
    last = next(i for i in range(3, 20) if all(len(graph[j] & {2, 9, i}) <= 2 for j in range(20)))
    dropouts = {2: DropStage.BEFORE_UPLOAD, 9: DropStage.BEFORE_UPLOAD, last: DropStage.BEFORE_UNMASKING}

    run = run_loopback(config, inputs, SESSION, dropouts, seed=SEED)

    survivors = tuple(i for i in range(20) if i not in (2, 9))
    assert run.result.survivors == survivors
    np.testing.assert_array_equal(run.result.field_sum, plain_sum(config, inputs, survivors))


def test_same_seeds_give_the_same_bytes_and_another_session_other_masks() -> None:
    config = SecAggConfig(vector_length=32, threshold=3)
    inputs = quantised_inputs(config, range(4))

    def masked_bytes(session: bytes) -> list[bytes]:
        clients, _, deliveries = until_masking(config, range(4), session)
        return [clients[i].mask(deliveries[i], inputs[i]).to_bytes() for i in range(4)]

    assert masked_bytes(SESSION) == masked_bytes(SESSION)
    assert all(a != b for a, b in zip(masked_bytes(SESSION), masked_bytes(b"another round"), strict=True))


def test_client_reveals_shares_once_and_only_after_threshold_survivors_signed_its_request() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)
    inputs = quantised_inputs(config, range(4))
    clients, _, request, signed = until_signed(config, inputs)
    assert request == UnmaskRequest((0, 1, 2, 3), ())

    first = clients[0].unmask(signed)
    assert [owner for owner, _ in first.self_seed_shares] == [1, 2, 3]
    assert first.mask_key_shares == ()
    with pytest.raises(ProtocolError, match="the next step is nothing"):
        clients[0].unmask(signed)  # one answer per session: a second request gets nothing
    with pytest.raises(RefusedError, match="refused this session earlier"):
        clients[0].unmask(signed)

    too_few = SignedSurvivors(signed.signatures[:2])
    with pytest.raises(UnmaskRefusedError, match="only 2 survivors signed"):
        clients[1].unmask(wire(too_few))
    with pytest.raises(RefusedError, match="refused this session earlier"):
        clients[1].unmask(signed)  # after a refusal the client never answers that session again
    other_list = clients[3].identity.sign(survivors_payload(SESSION, (0, 1, 2), (3,)))
    forged = SignedSurvivors((*signed.signatures[:2], SurvivorSignature(3, other_list)))
    with pytest.raises(ProtocolError, match="client 3's survivor list: the signature does not verify"):
        clients[2].unmask(wire(forged))
    assert clients[3].unmask(signed).self_seed_shares


def test_client_refuses_to_sign_a_request_for_fewer_than_threshold_of_its_neighbours() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)
    inputs = quantised_inputs(config, range(4))
    clients, _, _ = until_unmasking(config, inputs)
    with pytest.raises(UnmaskRefusedError, match="only 1 of client 0's neighbours survive"):
        clients[0].sign_survivors(UnmaskRequest(survivors=(0, 1), dropped=(2, 3)))
    with pytest.raises(UnmaskRefusedError, match="both survived and dropped"):
        clients[1].sign_survivors(UnmaskRequest(survivors=(0, 1, 2, 3), dropped=(3,)))


def _tampered(delivery: ShareDelivery, **changes) -> ShareDelivery:
    first = dataclasses.replace(delivery.shares[0], **changes)
    return ShareDelivery(delivery.recipient, (first, *delivery.shares[1:]))


def test_tampered_or_misdirected_shares_are_rejected() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)
    inputs = quantised_inputs(config, range(5))
    clients, _, deliveries = until_masking(config, range(5))
    first = deliveries[1].shares[0]
    ciphertext = bytearray(first.ciphertext)
    ciphertext[5] ^= 0x01
    nonce = bytes([first.nonce[0] ^ 0x80]) + first.nonce[1:]
    with pytest.raises(ShareDecryptionError, match="failed authentication"):
        clients[1].mask(wire(_tampered(deliveries[1], ciphertext=bytes(ciphertext))), inputs[1])
    with pytest.raises(RefusedError, match="refused this session earlier"):  # the session is over for it
        clients[1].mask(deliveries[1], inputs[1])
    with pytest.raises(ShareDecryptionError, match="failed authentication"):
        clients[2].mask(wire(_tampered(deliveries[2], nonce=nonce)), inputs[2])

    other = deliveries[4].shares[0]  # client 0's share for client 4, relabelled for client 3
    assert (other.sender, deliveries[3].shares[0].sender) == (0, 0)
    relabelled = ShareDelivery(3, (dataclasses.replace(other, recipient=3), *deliveries[3].shares[1:]))
    with pytest.raises(ShareDecryptionError):
        clients[3].mask(wire(relabelled), inputs[3])
    assert clients[0].mask(deliveries[0], inputs[0]).client_id == 0  # a genuine delivery works


def test_a_share_replayed_from_another_session_is_rejected() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)
    inputs = quantised_inputs(config, range(4))
    # same seeds, so the same keys: only the session id differs
    clients, _, _ = until_masking(config, range(4), session=b"round 1")
    _, _, old_deliveries = until_masking(config, range(4), session=b"round 0")
    with pytest.raises(ShareDecryptionError):
        clients[0].mask(old_deliveries[0], inputs[0])


def test_server_refuses_bad_share_uploads() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)
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
    config = SecAggConfig(vector_length=16, threshold=3)
    clients = seeded_clients(config, range(4))
    advertisements = [client.advertise() for client in clients.values()]
    with pytest.raises(ProtocolError, match="own public keys"):
        clients[0].share_keys(Roster(SESSION, tuple(advertisements[1:])))
    ad = advertisements[3]
    zero_key = dataclasses.replace(ad, share_public_key=bytes(32))  # a low-order point
    with pytest.raises(ProtocolError, match="keys of client 3: the signature does not verify"):
        clients[1].share_keys(Roster(SESSION, (*advertisements[:3], zero_key)))
    signed_zero = dataclasses.replace(  # a malicious client 3 can sign a bad key of its own
        zero_key,
        signature=clients[3].identity.sign(advertisement_payload(SESSION, 3, ad.mask_public_key, bytes(32))),
    )
    with pytest.raises(ProtocolError, match="unusable"):
        clients[2].share_keys(Roster(SESSION, (*advertisements[:3], signed_zero)))


def test_server_refuses_bad_uploads_and_responses_and_the_round_goes_on() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)
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
        server.add_advertisement(KeyAdvertisement(5, bytes(32), bytes(32), bytes(32), bytes(64)))
    for i in (1, 2, 3):
        server.add_masked_input(masked[i])
    request = wire(server.unmask_request())
    signatures = {i: wire(clients[i].sign_survivors(request)) for i in range(4)}
    with pytest.raises(ProtocolError, match="client 1: the signature does not verify"):
        server.add_survivor_signature(dataclasses.replace(signatures[0], client_id=1))
    for signature in signatures.values():
        server.add_survivor_signature(signature)
    signed = wire(server.signed_survivors())

    response = clients[0].unmask(signed)
    with pytest.raises(ProtocolError, match="not a signer"):
        server.add_unmask_response(wire(dataclasses.replace(response, client_id=8)))
    not_asked = dataclasses.replace(response, mask_key_shares=response.self_seed_shares[:1])
    with pytest.raises(ProtocolError, match="not asked about"):
        server.add_unmask_response(wire(not_asked))
    server.add_unmask_response(wire(response))
    for i in range(1, 4):
        server.add_unmask_response(wire(clients[i].unmask(signed)))
    np.testing.assert_array_equal(server.result().field_sum, plain_sum(config, inputs, range(4)))


def test_server_leaves_out_clients_whose_neighbourhood_fell_below_the_threshold() -> None:
    config = SecAggConfig(vector_length=32, threshold=4, degree=8)
    ids = range(24)
    graph = roster_graph(config, ids)
    gone = sorted(graph[0])[:5]  # client 0 keeps 3 of its 8 neighbours: too few to recover its secrets
    inputs = quantised_inputs(config, ids)
    # devices configured below the majority floor (a device setting), so that the exclusion of
    # client 0 does not cascade through the whole graph
    clients = enrolled_clients(config, ids, SESSION, SEED, ThresholdFloor(minimum=3, majority=False))
    dropouts = dict.fromkeys(gone, DropStage.BEFORE_SHARING)

    run = run_loopback(config, inputs, SESSION, dropouts, clients=clients)

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
    config = SecAggConfig(vector_length=16, threshold=3)
    inputs = quantised_inputs(config, range(5))
    clients, server, deliveries = until_masking(config, range(5))
    for i in (0, 1, 2, 3):  # client 4 drops before uploading
        server.add_masked_input(wire(clients[i].mask(deliveries[i], inputs[i])))
    request = wire(server.unmask_request())
    assert request.dropped == (4,)
    for i in range(4):
        server.add_survivor_signature(wire(clients[i].sign_survivors(request)))
    signed = wire(server.signed_survivors())
    response = clients[0].unmask(signed)
    (owner, y), *_ = response.mask_key_shares
    garbled = dataclasses.replace(response, mask_key_shares=((owner, (y + 1) % PRIME),))
    server.add_unmask_response(wire(garbled))
    for i in (1, 2, 3):
        server.add_unmask_response(wire(clients[i].unmask(signed)))
    with pytest.raises(ProtocolError, match=r"inconsistent|do not match"):
        server.result()


def test_client_masks_only_field_vectors_of_the_configured_length() -> None:
    config = SecAggConfig(vector_length=16, threshold=3, modulus_bits=16)
    clients, _, deliveries = until_masking(config, range(4))
    for bad, reason in (
        (np.zeros(15, dtype=np.uint64), "16 elements"),
        (np.full(16, 1 << 16, dtype=np.uint64), "outside"),
        (np.zeros(16), "dtype float64"),  # floats must go through Quantizer.encode first
    ):
        with pytest.raises(ValueError, match=reason):
            clients[0].mask(deliveries[0], bad)
