"""PromptFL, client half: CoOp context trained locally, averaged by the server (FedAvg).

What travels up: `{"ctx": [n_ctx, W] float32}`, the client's NEW context after local training
(not the difference), so the server's example-weighted average of what it receives is the next
global context. With client-level DP the new context is `global + noised(clip(new - global))`:
the update is clipped to `clip` and noised on the device, so the server only ever sees the
privatised value. The task carries the global `ctx` from round 1 on (the aggregator starts it
from the run's shared seeded initialisation); a task without one starts from that same
initialisation (settings `seed`, `ctx_init_std`).

Also sent, in the clear: the number of local training examples, a few metrics (local accuracy of
the uploaded context and of the received one on the local hold-out, training loss/accuracy) and the
privacy report. The DP guarantee covers the uploaded tensors only; these counts and metrics are
outside it (documented, not hidden).
"""

from __future__ import annotations

import numpy as np
import torch

from edge_client.methods import register
from edge_client.methods.base import ClientMethod, LocalRound, RoundTask
from edge_client.methods.round_parts import client_level_upload, global_context
from edge_client.training import Params, PromptObjective
from fedprompt.common.methods import TaskSettings


@register
class PromptFLClient(ClientMethod):
    name = "promptfl"

    def prepare(self, task: RoundTask, settings: TaskSettings) -> LocalRound:
        ws, core = self.workspace, settings.core
        start = global_context(task, core, ws.text_width)
        objective = PromptObjective.coop(ws.text_encoder(core.n_ctx), ws.logit_scale)
        return LocalRound(task, settings, objective, {"ctx": start})

    def upload(self, round_: LocalRound, trained: Params) -> dict[str, np.ndarray]:
        return {"ctx": client_level_upload(round_.params["ctx"], trained["ctx"], round_.settings.core)}

    def served(self, round_: LocalRound, trained: Params, upload: dict[str, np.ndarray]) -> Params:
        """The uploaded (under client DP: privatised) context."""
        return {"ctx": torch.from_numpy(upload["ctx"])}
