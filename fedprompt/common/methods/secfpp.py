"""SecFPP (domain prompts of securely found client clusters plus class-level prompts kept on the
device): global state `{"domain": [K, n_ctx, W], "centroids": [K, d]}`, one cluster before round
1 (the shared initialisation, a zero centroid); updates are `clusters`-slot vectors `{"domain":
[S, n_ctx, W], "member": [S], "descriptor": [S, d], "spread": [S]}`, only ever securely
summed (required), every client weighing 1. Client: `clusters` S (the most clusters: the slots),
`cluster_dim` d (the public projection clients are clustered on). Server: `split_gain` (a cluster
splits when that explains at least this share of the total scatter), `min_cluster_size` (a cluster
with fewer clients is not released: its sums are held back and its clients join the nearest
released one)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.methods.spec import MethodSpec, Shapes, TaskSettings, register
from fedprompt.common.prompt_init import initial_context
from fedprompt.common.settings import SettingsSection


@dataclass(frozen=True)
class SecFPPClient(SettingsSection):
    clusters: int = 4
    cluster_dim: int = 8

    def check(self) -> None:
        self._check(self.clusters >= 1, "clusters", "must be at least 1")
        self._check(self.cluster_dim >= 2, "cluster_dim", "must be at least 2")


@dataclass(frozen=True)
class SecFPPServer(SettingsSection):
    split_gain: float = 0.1
    min_cluster_size: int = 3

    def check(self) -> None:
        self._check(0 < self.split_gain < 1, "split_gain", "must be in (0, 1)")
        self._check(self.min_cluster_size >= 1, "min_cluster_size", "must be at least 1")


def one_cluster(task: TaskSettings, dims: BundleDims) -> dict[str, np.ndarray]:
    core = task.core
    domain = initial_context(core.n_ctx, dims.text_width, core.ctx_init_std, core.seed)
    return {"domain": domain[None], "centroids": np.zeros((1, task.client.cluster_dim), np.float32)}


def slotted_upload(task: TaskSettings, dims: BundleDims) -> Shapes:
    s, d = task.client.clusters, task.client.cluster_dim
    return {
        "domain": (s, task.core.n_ctx, dims.text_width),
        "member": (s,),
        "descriptor": (s, d),
        "spread": (s,),
    }


SPEC = register(
    MethodSpec(
        name="secfpp",
        client_settings=SecFPPClient,
        server_settings=SecFPPServer,
        dp_modes=("none", "sample"),
        secure_aggregation="required",
        capabilities=("text_prompts",),
        initial_state=one_cluster,
        update_shapes=slotted_upload,
        weighs_by_examples=False,
    )
)
