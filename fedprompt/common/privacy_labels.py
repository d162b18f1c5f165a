"""How fedprompt names an epsilon: what it protects (its adjacency) and which accountant gave it.

No opacus here, so the aggregator can label the epsilons devices report without loading torch.
"""

from __future__ import annotations

ACCOUNTANT_KINDS = ("prv", "rdp")
ACCOUNTANT_NAMES = {"prv": "opacus PRV", "rdp": "opacus RDP", "skellam": "Skellam RDP (Agarwal et al. 2021)"}
SHORT_ADJACENCY = {
    "client": "client-level, replace-one",
    "sample": "sample-level, add/remove",
    "global": "replace-one",
    "distributed": "client-level, replace-one, secure sum",
}
ADJACENCY = {
    "client": "client-level, replace-one adjacency: a device's whole local dataset",
    "sample": "sample-level, add/remove adjacency: one example of a device",
    "global": "client-level, replace-one adjacency: one client's update, against all but the aggregator",
    "distributed": (
        "client-level, replace-one adjacency: one client's update, against the aggregator and the "
        "released model, the sum's noise counted at the secure-aggregation threshold of survivors"
    ),
}


def describe_epsilon(epsilon: float, delta: float, dp: str, accountant: str) -> str:
    """An epsilon as fedprompt prints it: with its delta, what it protects and its accountant."""
    return f"epsilon {epsilon:.2f} at delta {delta:g} ({ADJACENCY[dp]}; {ACCOUNTANT_NAMES[accountant]})"


def short_label(dp: str, accountant: str) -> str:
    """The adjacency and accountant of an epsilon, for a table cell."""
    return f"{SHORT_ADJACENCY[dp]}, {ACCOUNTANT_NAMES[accountant]}"
