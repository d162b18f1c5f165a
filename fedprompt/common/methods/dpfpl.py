"""DP-FPL (a global prompt averaged by the server plus a low-rank local prompt kept on the device):
global state `{"ctx": [n_ctx, W]}`, zero before round 1 (the local prompts carry the
initialisation); updates are the clients' new global prompts. Local DP is DP-SGD over the global
prompt and the low-rank factors (`dp = "sample"`); client-level DP would protect the upload only.
Client: `rank` of the local prompt's low-rank part. Server: global DP on the aggregate (each
update clipped to `global_clip`, noise `global_noise_multiplier * global_clip` on the sum; 0 = off)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.methods.spec import MethodSpec, TaskSettings, register
from fedprompt.common.settings import SettingsError, SettingsSection


@dataclass(frozen=True)
class DPFPLClient(SettingsSection):
    rank: int = 8

    def check(self) -> None:
        self._check(self.rank >= 1, "rank", "must be at least 1")


@dataclass(frozen=True)
class DPFPLServer(SettingsSection):
    global_clip: float = 1.0
    global_noise_multiplier: float = 0.0

    def check(self) -> None:
        self._check(self.global_clip > 0, "global_clip", "must be positive")
        self._check(self.global_noise_multiplier >= 0, "global_noise_multiplier", "must be >= 0 (0 = off)")


def zero_prompt(task: TaskSettings, dims: BundleDims) -> dict[str, np.ndarray]:
    return {"ctx": np.zeros((task.core.n_ctx, dims.text_width), np.float32)}


def rank_fits(task: TaskSettings) -> None:
    if task.client.rank > task.core.n_ctx:
        raise SettingsError(f"setting 'rank' must be at most n_ctx ({task.core.n_ctx}) for dpfpl")


SPEC = register(
    MethodSpec(
        name="dpfpl",
        client_settings=DPFPLClient,
        server_settings=DPFPLServer,
        dp_modes=("none", "sample"),
        secure_aggregation="none",
        capabilities=("text_prompts",),
        initial_state=zero_prompt,
        check_settings=rank_fits,
    )
)
