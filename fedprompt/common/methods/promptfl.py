"""PromptFL (FedAvg of a CoOp prompt): global state `{"ctx": [n_ctx, W]}` from the shared seeded
initialisation; every update is the client's new `ctx`. Server: `server_lr`, the share of the way
the global prompt moves to the round's average (1 = plain FedAvg)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.methods.spec import MethodSpec, NoSettings, TaskSettings, register
from fedprompt.common.prompt_init import initial_context
from fedprompt.common.settings import SettingsSection


@dataclass(frozen=True)
class PromptFLServer(SettingsSection):
    server_lr: float = 1.0

    def check(self) -> None:
        self._check(0 < self.server_lr <= 1, "server_lr", "must be in (0, 1]")


def shared_prompt(task: TaskSettings, dims: BundleDims) -> dict[str, np.ndarray]:
    """{"ctx": the run's seeded CoOp initialisation [n_ctx, text width]}."""
    core = task.core
    return {"ctx": initial_context(core.n_ctx, dims.text_width, core.ctx_init_std, core.seed)}


SPEC = register(
    MethodSpec(
        name="promptfl",
        client_settings=NoSettings,
        server_settings=PromptFLServer,
        dp_modes=("none", "client", "sample"),
        secure_aggregation="optional",
        capabilities=("text_prompts",),
        initial_state=shared_prompt,
    )
)
