"""The device's own rules for a session, checked before it reveals anything: they hold whatever
the aggregator announces, so an active aggregator cannot lower them.

- the threshold must reach the device's floor: at least `minimum`, and with `majority` more than
  half of the client's neighbourhood (itself included; the whole roster on the complete graph),
  so two disjoint groups of t clients cannot both exist and be shown different survivor lists;
- an unmask request must list only roster members, list this client as a survivor, keep the
  survivor and dropped sets disjoint and covering every neighbour that shared keys with it, and
  leave at least t of its neighbours surviving.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from fedprompt.common.secagg.errors import RefusedError, UnmaskRefusedError


@dataclass(frozen=True)
class ThresholdFloor:
    """The lowest threshold a device accepts; a device setting, never taken from the aggregator."""

    minimum: int = 3
    majority: bool = True

    def __post_init__(self) -> None:
        if self.minimum < 2:
            raise ValueError(f"the threshold floor must be at least 2, got {self.minimum}")

    def lowest(self, neighbourhood: int) -> int:
        """The smallest threshold accepted in a neighbourhood of `neighbourhood` clients (self included)."""
        return max(self.minimum, neighbourhood // 2 + 1 if self.majority else 0)

    def check(self, threshold: int, neighbourhood: int) -> None:
        lowest = self.lowest(neighbourhood)
        if threshold < lowest:
            raise RefusedError(
                f"threshold {threshold} is below this device's floor {lowest} for a neighbourhood of "
                f"{neighbourhood} clients"
            )


def check_unmask_request(
    client_id: int,
    threshold: int,
    roster: Collection[int],
    sharers: Collection[int],
    survivors: Collection[int],
    dropped: Collection[int],
) -> None:
    """UnmaskRefusedError unless the request fits the client's own view; `sharers` are the
    neighbours whose shares it holds (they added masks with it)."""
    listed = [*survivors, *dropped]
    survivors, dropped, sharers = set(survivors), set(dropped), set(sharers)
    if len(set(listed)) != len(listed):
        raise UnmaskRefusedError("the request lists a client twice, or as both survived and dropped")
    strangers = (survivors | dropped) - set(roster)
    if strangers:
        raise UnmaskRefusedError(
            f"the request lists clients {sorted(strangers)[:5]} that are not in the roster"
        )
    if client_id not in survivors:
        raise UnmaskRefusedError(f"client {client_id} uploaded but is not listed as a survivor")
    uncovered = sharers - survivors - dropped
    if uncovered:
        raise UnmaskRefusedError(f"neighbours {sorted(uncovered)[:5]} are neither survivors nor dropped")
    surviving = len(sharers & survivors)
    if surviving < threshold or len(survivors) < threshold:
        raise UnmaskRefusedError(
            f"only {surviving} of client {client_id}'s neighbours survive, fewer than the threshold "
            f"{threshold}: the sum would be too close to an individual input"
        )
