"""pFedMoAP (a local prompt mixed with downloaded prompt experts by a local gating network):
global state `{"ctx": [n_ctx, W]}` from the shared initialisation; tasks add `experts`
[E, n_ctx, W] per client; updates are the clients' new local prompts. No sample-level DP-SGD is
offered (the gating network trains beside the prompt). Client: `experts` K (the local prompt and
K-1 downloaded), `mixture_lambda` (weight of the local logits), the gating network's
`gating_dim`, `gating_heads` and `gating_scaling` (of the attention scores)."""

from __future__ import annotations

from dataclasses import dataclass

from fedprompt.common.methods.promptfl import shared_prompt
from fedprompt.common.methods.spec import MethodSpec, NoSettings, register
from fedprompt.common.settings import SettingsSection


@dataclass(frozen=True)
class PFedMoAPClient(SettingsSection):
    experts: int = 10
    mixture_lambda: float = 0.5
    gating_dim: int = 128
    gating_heads: int = 8
    gating_scaling: float = 10.0

    def check(self) -> None:
        self._check(self.experts >= 1, "experts", "must be at least 1")
        self._check(self.mixture_lambda >= 0, "mixture_lambda", "must be >= 0")
        self._check(self.gating_heads >= 1, "gating_heads", "must be at least 1")
        self._check(self.gating_dim >= 1, "gating_dim", "must be at least 1")
        divisible = self.gating_dim % self.gating_heads == 0
        self._check(divisible, "gating_dim", "must be a multiple of gating_heads")
        self._check(self.gating_scaling > 0, "gating_scaling", "must be positive")


SPEC = register(
    MethodSpec(
        name="pfedmoap",
        client_settings=PFedMoAPClient,
        server_settings=NoSettings,
        dp_modes=("none", "client"),
        secure_aggregation="none",
        capabilities=("text_prompts",),
        initial_state=shared_prompt,
    )
)
