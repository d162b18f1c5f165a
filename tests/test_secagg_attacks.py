"""The audit's attacks on secure aggregation, replayed by a malicious aggregator driving real
clients over the loopback transport (every message serialised): padded survivor lists, a
threshold below the devices' floor, substituted peer keys and split survivor views. In each, the
honest clients refuse before revealing the shares the attack needs, so the target's input cannot
be recovered. The SecAgg+ graph is drawn from the members' fresh keys, not only from the session
id the aggregator chooses."""

from __future__ import annotations

import dataclasses

import pytest
from secagg_session import SEED, SESSION, quantised_inputs, roster_graph

from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.errors import RefusedError, TooManyDropoutsError
from fedprompt.common.secagg.identity import DeviceIdentity, advertisement_payload
from fedprompt.common.secagg.loopback import LoopbackDriver, LoopbackRun, enrolled_clients, run_loopback
from fedprompt.common.secagg.messages import (
    Roster,
    SignedSurvivors,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)

TARGET = 0


class MaliciousDriver(LoopbackDriver):
    """Takes every signature it is sent and shows each client what the attack wants; in the end
    it keeps whatever shares arrived instead of asking the honest server for a sum."""

    def __init__(self, config: SecAggConfig, session_id: bytes) -> None:
        super().__init__(config, session_id)
        self.signatures: list[SurvivorSignature] = []

    def add_survivor_signature(self, message: SurvivorSignature) -> None:
        self.signatures.append(message)

    def signed_survivors(self) -> SignedSurvivors:
        return SignedSurvivors(tuple(self.signatures))

    def add_unmask_response(self, message: UnmaskResponse) -> None:
        pass  # kept in run.responses

    def result(self) -> None:
        return None


def revealed(run: LoopbackRun) -> tuple[dict[int, int], dict[int, int]]:
    """(self-mask seed shares, mask-key shares) the server got, counted per owner."""
    seeds: dict[int, int] = {}
    keys: dict[int, int] = {}
    for response in run.responses.values():
        for owner, _ in response.self_seed_shares:
            seeds[owner] = seeds.get(owner, 0) + 1
        for owner, _ in response.mask_key_shares:
            keys[owner] = keys.get(owner, 0) + 1
    return seeds, keys


def target_recoverable(run: LoopbackRun, config: SecAggConfig, neighbours: frozenset[int]) -> bool:
    """The target's input is exposed when its self mask and every neighbour's pairwise mask with
    it can be removed: t shares of its seed and of each neighbour's mask key."""
    seeds, keys = revealed(run)
    t = config.threshold
    return seeds.get(TARGET, 0) >= t and all(keys.get(peer, 0) >= t for peer in neighbours)


def attack(driver: LoopbackDriver, config: SecAggConfig, n: int) -> LoopbackRun:
    inputs = quantised_inputs(config, range(n))
    return run_loopback(config, inputs, SESSION, seed=SEED, driver=driver)


@pytest.mark.parametrize(("n", "threshold", "degree"), [(6, 4, None), (16, 4, 6)])
def test_a_survivor_list_padded_with_strangers_or_declaring_real_peers_dropped_is_refused(
    n: int, threshold: int, degree: int | None
) -> None:
    config = SecAggConfig(vector_length=16, threshold=threshold, degree=degree)
    neighbours = roster_graph(config, range(n))[TARGET]

    class Padding(MaliciousDriver):
        def request_for(self, client_id: int, request: UnmaskRequest) -> UnmaskRequest:
            if degree is None:  # strangers as survivors, every real peer dropped
                return UnmaskRequest((TARGET, 9001, 9002, 9003), tuple(range(1, n)))
            listed = (TARGET, *sorted(neighbours)[: threshold - 1])  # real ids only, t of them
            return UnmaskRequest(listed, tuple(i for i in range(n) if i not in listed))

    run = attack(Padding(config, SESSION), config, n)

    assert run.responses == {}
    assert not target_recoverable(run, config, neighbours)
    reasons = set(run.refusals.values())
    assert len(run.refusals) == n  # everyone was sent the request; nobody signed it
    if degree is None:
        assert reasons == {"the request lists clients [9001, 9002, 9003] that are not in the roster"}
    else:
        assert any("is not listed as a survivor" in r for r in reasons)  # the target's neighbours
        assert any("neighbours survive, fewer than the threshold" in r for r in reasons)


def test_a_threshold_below_the_devices_floor_is_refused_before_any_share_leaves() -> None:
    config = SecAggConfig(vector_length=16, threshold=3)  # the aggregator's choice for 7 clients
    with pytest.raises(TooManyDropoutsError, match="0 clients completed key sharing"):
        attack(LoopbackDriver(config, SESSION), config, 7)
    clients = enrolled_clients(config, range(7), SESSION, SEED)
    server = LoopbackDriver(config, SESSION).server
    for client in clients.values():
        server.add_advertisement(client.advertise())
    roster = server.roster()
    for client in clients.values():
        with pytest.raises(RefusedError, match="threshold 3 is below this device's floor 4"):
            client.share_keys(roster)


@pytest.mark.parametrize("forger", ["own identity", "target's identity key"])
def test_substituted_peer_keys_are_refused_without_any_dropout(forger: str) -> None:
    config = SecAggConfig(vector_length=16, threshold=4)
    impostor = DeviceIdentity.generate()
    mask, share = b"\x09" * 32, b"\x0a" * 32  # keys whose private halves the aggregator holds

    class Substitution(MaliciousDriver):
        def roster_for(self, client_id: int, roster: Roster) -> Roster:
            if client_id == TARGET:
                return roster
            real = roster.advertisements[TARGET]
            identity = impostor.public_key if forger == "own identity" else real.identity_key
            signature = impostor.sign(advertisement_payload(SESSION, TARGET, mask, share))
            fake = dataclasses.replace(
                real, mask_public_key=mask, share_public_key=share, identity_key=identity, signature=signature
            )
            return Roster(roster.session_id, (fake, *roster.advertisements[1:]))

    with pytest.raises(TooManyDropoutsError):  # nobody but the target shared keys
        attack(Substitution(config, SESSION), config, 6)
    clients = enrolled_clients(config, range(6), SESSION, SEED)
    driver = Substitution(config, SESSION)
    for client in clients.values():
        driver.server.add_advertisement(client.advertise())
    roster = driver.server.roster()
    expected = "not the one this device trusts" if forger == "own identity" else "does not verify"
    for i in range(1, 6):
        with pytest.raises(Exception, match=expected):
            clients[i].share_keys(driver.roster_for(i, roster))


def test_split_survivor_views_never_give_both_secrets_of_the_target() -> None:
    n, config = 7, SecAggConfig(vector_length=16, threshold=4)
    seen_alive = {0, 1, 2, 3}  # told the target survived: would reveal its self-mask seed shares
    everyone = tuple(range(n))

    class SplitView(MaliciousDriver):
        def request_for(self, client_id: int, request: UnmaskRequest) -> UnmaskRequest:
            if client_id in seen_alive:
                return UnmaskRequest(everyone, ())
            return UnmaskRequest(everyone[1:], (TARGET,))  # told it dropped: would reveal its mask key

        def signatures_for(self, client_id: int, signed: SignedSurvivors) -> SignedSurvivors:
            same_view = [
                s for s in signed.signatures if (s.client_id in seen_alive) == (client_id in seen_alive)
            ]
            return SignedSurvivors(tuple(same_view))

    run = attack(SplitView(config, SESSION), config, n)

    seeds, keys = revealed(run)
    assert keys.get(TARGET, 0) == 0  # the minority saw fewer than t signatures of its list
    assert set(run.refusals) == set(everyone) - seen_alive
    assert set(run.refusals.values()) == {
        "only 3 survivors signed the survivor list, fewer than the threshold 4: others may have been "
        "shown another list"
    }
    assert not target_recoverable(run, config, frozenset(everyone[1:]))
    assert seeds.get(TARGET, 0) == len(seen_alive) - 1  # the majority's view was consistent, and
    # the target's self-mask seed alone is useless while its pairwise masks stay


def test_the_secagg_plus_graph_comes_from_the_members_keys_not_from_the_aggregators_session_id() -> None:
    config = SecAggConfig(vector_length=16, threshold=4, degree=6)
    graph = roster_graph(config, range(16))
    assert roster_graph(config, range(16)) == graph  # every party computes the same graph
    # the same session id with other clients' fresh keys: another graph the aggregator did not pick
    assert roster_graph(config, range(16), seed=bytes(range(1, 33))) != graph
