"""One row of metrics per (method, seed, round), built from what the clients reported.

Accuracies are the clients' own `metrics["accuracy"]` (the model each client ends the round with,
on its held-out set) and `metrics["received_accuracy"]` (what the client starts the round from:
the server's model, with the client's local parts for personalised methods, before local
training), as stored by the aggregator for federated runs. `served_accuracy`, on the last round's
row only, is what each client is left with after the run (`fedprompt.harness.served_model`).
`accuracy` weighs every client equally (each has a held-out set of its own), `accuracy_weighted`
by local examples as the aggregator logs its "mean local accuracy". Bytes are per participating
client, as counted on the wire. `epsilon` is the largest local epsilon a participant reported;
`server_epsilon` the central-DP epsilon a server half reports in its round metrics as
`global_epsilon` (e.g. DP-FPL's global DP).

Clustering hook: a method whose clients report `metrics["cluster"]` (any number naming the cluster
the client joined) gets the adjusted Rand index of those clusters against the clients' true
domains in column `ari`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.store import ClientRoundRecord

CLUSTER_METRIC = "cluster"
SERVER_EPSILON_METRIC = "global_epsilon"
COLUMNS = (
    "experiment",
    "method",
    "method_name",
    "seed",
    "split_id",
    "round",
    "participants",
    "accuracy",
    "served_accuracy",
    "served_base",
    "served_new",
    "served_hm",
    "served_unseen",
    "accuracy_std_clients",
    "accuracy_weighted",
    "received_accuracy",
    "train_accuracy",
    "bytes_up",
    "bytes_down",
    "epsilon",
    "delta",
    "server_epsilon",
    "noise_multiplier",
    "ari",
)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def round_row(
    clients: Sequence[ClientRoundRecord],
    domains: Mapping[str, str],
    identity: Mapping[str, Any],
    server_metrics: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The row of one round from its participants' records and the server half's round metrics;
    `domains` maps client id -> true domain and `identity` gives the experiment, method, seed,
    split id, round and noise multiplier."""
    accuracy = [c.metrics["accuracy"] for c in clients if "accuracy" in c.metrics]
    weights = [c.num_examples for c in clients if "accuracy" in c.metrics]
    epsilons = [c.privacy["epsilon"] for c in clients if "epsilon" in c.privacy]
    deltas = [c.privacy["delta"] for c in clients if "delta" in c.privacy]
    trained = [c for c in clients if "train_accuracy" in c.metrics]
    row = {column: None for column in COLUMNS}
    row.update(identity)
    row.update(
        participants=len(clients),
        accuracy=_mean(accuracy),
        accuracy_std_clients=float(np.std(accuracy)) if accuracy else None,
        accuracy_weighted=float(np.average(accuracy, weights=weights)) if accuracy else None,
        received_accuracy=_mean(
            [c.metrics["received_accuracy"] for c in clients if "received_accuracy" in c.metrics]
        ),
        train_accuracy=float(
            np.average(
                [c.metrics["train_accuracy"] for c in trained], weights=[c.num_examples for c in trained]
            )
        )
        if trained
        else None,
        bytes_up=_mean([float(c.bytes_up) for c in clients]),
        bytes_down=_mean([float(c.bytes_down) for c in clients]),
        epsilon=max(epsilons) if epsilons else None,
        delta=max(deltas) if deltas else None,
        server_epsilon=(server_metrics or {}).get(SERVER_EPSILON_METRIC),
        ari=cluster_agreement(clients, domains),
    )
    return row


def cluster_agreement(clients: Sequence[ClientRoundRecord], domains: Mapping[str, str]) -> float | None:
    """Adjusted Rand index of the reported clusters against the true domains (None when fewer than
    two participants report a cluster)."""
    reported = [c for c in clients if CLUSTER_METRIC in c.metrics]
    if len(reported) < 2:
        return None
    from sklearn.metrics import adjusted_rand_score  # only methods that cluster need scikit-learn

    truth = [domains[c.client_id] for c in reported]
    found = [round(c.metrics[CLUSTER_METRIC]) for c in reported]
    return float(adjusted_rand_score(truth, found))
