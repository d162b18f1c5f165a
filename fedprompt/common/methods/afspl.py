"""AFSPL (seed 002: soft prompts for a frozen CLIP + T5 captioner, adaptive fusion, top-K upload):
global state `{"global": [prompt_tokens, d_model]}` (the decoder's width), the run's seeded
N(0, prompt_init_std^2) before round 1; every update is `{"rows": [K, d_model], "indices": [K]}`,
the K = ceil(top_k_fraction * prompt_tokens) rows of the client's global-prompt update (new - sent)
with the largest L2 norm and their row numbers. The local prompt, the gate and the modality prompt
generator stay on the device. Client: `prompt_tokens`, `top_k_fraction`, `gate` ("softmax": the
fused prompt w_g * global + w_l * local + w_m * modality(image) with softmax gate weights; "none":
the global prompt alone, no local parts) and `prompt_init_std`. Local DP: dp = "client" clips and
noises the whole update before the rows are chosen, dp = "sample" is DP-SGD over every trained
tensor; either way the selection is post-processing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.methods.spec import MethodSpec, NoSettings, Shapes, TaskSettings, register
from fedprompt.common.prompt_init import initial_context
from fedprompt.common.settings import SettingsError, SettingsSection

GATES = ("softmax", "none")


@dataclass(frozen=True)
class AFSPLClient(SettingsSection):
    prompt_tokens: int = 16
    top_k_fraction: float = 0.3
    gate: str = "softmax"
    prompt_init_std: float = 0.02

    def check(self) -> None:
        self._check(self.prompt_tokens >= 1, "prompt_tokens", "must be at least 1")
        self._check(0 < self.top_k_fraction <= 1, "top_k_fraction", "must be in (0, 1]")
        self._check(self.gate in GATES, "gate", f"must be one of {', '.join(GATES)}")
        self._check(self.prompt_init_std > 0, "prompt_init_std", "must be positive")

    @property
    def rows_sent(self) -> int:
        """K = ceil(top_k_fraction * prompt_tokens), at least 1 (30% of 16 rows -> 5)."""
        return max(1, math.ceil(self.top_k_fraction * self.prompt_tokens - 1e-9))


def decoder_width(dims: BundleDims) -> int:
    if dims.decoder_width is None:
        raise SettingsError(
            "method afspl needs a bundle with a captioning decoder (fedprompt export --decoder)"
        )
    return dims.decoder_width


def global_prompt(task: TaskSettings, dims: BundleDims) -> dict[str, np.ndarray]:
    """{"global": the run's seeded initialisation [prompt_tokens, d_model]}."""
    client = task.client
    return {
        "global": initial_context(
            client.prompt_tokens, decoder_width(dims), client.prompt_init_std, task.core.seed
        )
    }


def row_upload(task: TaskSettings, dims: BundleDims) -> Shapes:
    k = task.client.rows_sent
    return {"rows": (k, decoder_width(dims)), "indices": (k,)}


SPEC = register(
    MethodSpec(
        name="afspl",
        client_settings=AFSPLClient,
        server_settings=NoSettings,
        dp_modes=("none", "client", "sample"),
        secure_aggregation="none",
        capabilities=("captioning",),
        initial_state=global_prompt,
        update_shapes=row_upload,
    )
)
