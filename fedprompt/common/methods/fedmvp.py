"""FedMVP (a PromptFormer turning image patch embeddings and class attribute sentences into visual
prompt tokens for the frozen image tower): global state the PromptFormer's tensors
(`fedprompt.common.promptformer`, sized from the bundle's image and embedding widths, seeded by
`seed`); updates are the clients' round deltas (new - received), compressed as `compression`
says (`fedprompt.common.compact_update`: "none", or "lowrank" factors of rank
`compression_rank` with error feedback on the device); the server averages the decoded deltas.
Needs a bundle with visual prompts. Client: `prompt_tokens` P (4), `former_heads` (4),
`ff_mult` of the GEGLU feed-forward (4), `alpha` of the consistency loss (10): the paper's and
official code's values; `compression`, `compression_rank`. Secure aggregation sums dense deltas,
so it needs `compression = "none"`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.compact_update import COMPRESSIONS, upload_shapes
from fedprompt.common.methods.spec import MethodSpec, NoSettings, Shapes, TaskSettings, register
from fedprompt.common.promptformer import PromptFormerShape, initial_promptformer
from fedprompt.common.settings import SettingsError, SettingsSection


@dataclass(frozen=True)
class FedMVPClient(SettingsSection):
    prompt_tokens: int = 4
    former_heads: int = 4
    ff_mult: int = 4
    alpha: float = 10.0
    compression: str = "none"
    compression_rank: int = 4

    def check(self) -> None:
        self._check(self.prompt_tokens >= 1, "prompt_tokens", "must be at least 1")
        self._check(self.former_heads >= 1, "former_heads", "must be at least 1")
        self._check(self.ff_mult >= 1, "ff_mult", "must be at least 1")
        self._check(self.alpha >= 0, "alpha", "must be >= 0")
        choices = ", ".join(COMPRESSIONS)
        self._check(self.compression in COMPRESSIONS, "compression", f"must be one of {choices}")
        self._check(self.compression_rank >= 1, "compression_rank", "must be at least 1")


def former_shape(task: TaskSettings, dims: BundleDims) -> PromptFormerShape:
    if dims.image_width is None:
        raise SettingsError(f"method fedmvp needs a bundle with visual prompts; {dims.model}'s has none")
    client = task.client
    try:
        return PromptFormerShape(dims.embed_dim, dims.image_width, client.former_heads, client.ff_mult)
    except ValueError as error:
        raise SettingsError(f"setting 'former_heads': {error}") from None


def initial_former(task: TaskSettings, dims: BundleDims) -> dict[str, np.ndarray]:
    return initial_promptformer(former_shape(task, dims), task.core.seed)


def compressed_update(task: TaskSettings, dims: BundleDims) -> Shapes:
    client = task.client
    return upload_shapes(former_shape(task, dims).shapes(), client.compression, client.compression_rank)


def unsummable(task: TaskSettings) -> str | None:
    if task.client.compression != "none":
        return (
            f'a sum of {task.client.compression} uploads is not the upload of a sum: set compression = "none"'
        )
    return None


SPEC = register(
    MethodSpec(
        name="fedmvp",
        client_settings=FedMVPClient,
        server_settings=NoSettings,
        dp_modes=("none", "client", "sample"),
        secure_aggregation="optional",
        capabilities=("visual_prompts",),
        initial_state=initial_former,
        update_shapes=compressed_update,
        unsummable=unsummable,
    )
)
