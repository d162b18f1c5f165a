"""SecFPP's server half (seed 001, Hou et al.; no public code): domain-level prompts, one per
cluster of clients, from securely summed uploads only.

The global state is `{"domain": [K, n_ctx, W], "centroids": [K, d]}`, sent alike to every client
(so what a client receives says nothing of its cluster); before round 1 one cluster with the shared
initialisation and a zero centroid (the spec's). Each client uploads
a `clusters`-slot vector with its new domain prompt, a count of 1, its descriptor and the
descriptor's squared norm in the slot of the centroid nearest to it
(`edge_client.methods.domain_clusters`). The aggregator sums the uploads with secure aggregation
(required: the strategy refuses to run without it), every client weighing 1. From the sums:

- per cluster, the new domain prompt is the mean of its members' domain prompts;
- the centroids take one K-means step and K adapts (`aggregator.strategies.adaptive_kmeans`); a
  cluster split in two gives both halves its domain prompt;
- a slot with fewer than `min_cluster_size` clients is not released: no domain prompt or centroid
  is computed from it (its sums are held back) and its clients join the nearest released cluster.

What the server learns per round: for every slot, the number of clients in it, the sum of their
domain prompts, descriptors and squared descriptor norms; not which client is in which slot, and
no second moment per direction. A slot with one client still shows the server that (anonymous)
client's domain prompt and descriptor (it is never released to the clients), and descriptors,
fixed after a client's first round, can be recovered by differencing two rounds in which one
client changed slot; under sample-level DP both are DP outputs of the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregator.strategies import register
from aggregator.strategies.adaptive_kmeans import Bisection, SlotSums, cluster_step
from aggregator.strategies.base import ClientUpdate, ServerStrategy
from aggregator.strategies.combine import UpdateCombiner
from fedprompt.common.methods import RunSettings
from fedprompt.common.secure_round import WeightedSum


@register
class SecFPPStrategy(ServerStrategy):
    name = "secfpp"

    def __init__(self, settings: RunSettings, combiner: UpdateCombiner | None = None) -> None:
        super().__init__(settings, combiner)
        self.slots, self.split_gain = settings.client.clusters, settings.server.split_gain
        self.min_size = settings.server.min_cluster_size
        self.bisection = Bisection()

    def aggregate(
        self, state: dict[str, np.ndarray], updates: list[ClientUpdate]
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        raise RuntimeError("secfpp aggregates securely summed uploads only (aggregate_sum)")

    def state_dict(self) -> dict[str, Any]:
        return {"bisection": self.bisection.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bisection = Bisection.from_dict(state.get("bisection", {}))

    def aggregate_sum(
        self, state: dict[str, np.ndarray], total: WeightedSum
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        t = total.tensors
        sums = SlotSums(t["member"], t["descriptor"], t["spread"])
        step = cluster_step(sums, self.slots, self.split_gain, self.min_size, self.bisection)
        self.bisection = step.bisection
        if not step.sources:  # no slot had min_cluster_size clients: release nothing new
            return state, step.metrics
        counts = np.maximum(np.rint(t["member"]), 1.0)
        domain = np.stack([t["domain"][group].sum(axis=0) / counts[group].sum() for group in step.sources])
        return {
            "domain": domain.astype(np.float32),
            "centroids": step.centroids.astype(np.float32),
        }, step.metrics
