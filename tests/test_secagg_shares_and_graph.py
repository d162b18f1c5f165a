"""Shamir sharing recovers a secret from any `threshold` shares and not from fewer; the neighbour
graphs are what SecAgg and SecAgg+ need (complete, or k-regular and symmetric) and every party
derives the same one."""

from __future__ import annotations

import itertools

import pytest

from fedprompt.common.secagg.errors import ProtocolError
from fedprompt.common.secagg.graph import neighbourhoods
from fedprompt.common.secagg.randomness import RandomBytes
from fedprompt.common.secagg.shamir import PRIME, combine, split

SECRET = bytes(range(100, 132))


def test_any_threshold_shares_recover_the_secret() -> None:
    shares = split(SECRET, 3, range(1, 7), RandomBytes(bytes(32)))
    for subset in itertools.combinations(shares, 3):
        assert combine({x: shares[x] for x in subset}, 3) == SECRET


def test_fewer_shares_are_refused() -> None:
    shares = split(SECRET, 3, range(1, 7), RandomBytes(bytes(32)))
    with pytest.raises(ValueError, match="cannot recover"):
        combine({1: shares[1], 2: shares[2]}, 3)


def test_a_randomly_altered_share_is_detected() -> None:
    """The secret is 256 bits in a 521-bit field: a garbled share lands outside with overwhelming odds."""
    shares = split(SECRET, 2, [1, 2], RandomBytes(bytes(32)))
    garble = int.from_bytes(RandomBytes(bytes([7] * 32)).take(65), "big")
    with pytest.raises(ProtocolError, match="inconsistent"):
        combine({1: shares[1], 2: (shares[2] + garble) % PRIME}, 2)


def test_complete_graph_without_degree() -> None:
    graph = neighbourhoods([5, 1, 9, 3], None, b"s")
    assert graph == {i: frozenset({1, 3, 5, 9} - {i}) for i in (1, 3, 5, 9)}


@pytest.mark.parametrize(("n", "degree"), [(20, 6), (11, 4), (50, 10)])
def test_secagg_plus_graph_is_k_regular_symmetric_and_shared(n: int, degree: int) -> None:
    ids = list(range(100, 100 + n))
    graph = neighbourhoods(ids, degree, b"session")
    assert all(len(peers) == degree and i not in peers for i, peers in graph.items())
    assert all(i in graph[j] for i, peers in graph.items() for j in peers)
    assert neighbourhoods(reversed(ids), degree, b"session") == graph  # every party computes the same
    assert neighbourhoods(ids, degree, b"next session") != graph  # a fresh random graph each session


def test_odd_degree_is_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        neighbourhoods(range(10), 3, b"s")
