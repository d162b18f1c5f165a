"""PromptFL, client half: CoOp context trained locally, averaged by the server (FedAvg).

What travels up: `{"ctx": [n_ctx, W] float32}`, the client's NEW context after local training
(not the difference), so the server's example-weighted average of what it receives is the next
global context. With client-level DP the new context is `global + noised(clip(new - global))`:
the update is clipped to `clip` and noised on the device, so the server only ever sees the
privatised value. Round 1 arrives with no `ctx`; every client then starts from the same seeded
CoOp initialisation (settings `seed`, `ctx_init_std`).

Also sent, in the clear: the number of local training examples, a few metrics (local accuracy of
the uploaded context and of the received one on the local hold-out, training loss/accuracy) and the
privacy report. The DP guarantee covers the uploaded tensors only; these counts and metrics are
outside it (documented, not hidden).
"""

from __future__ import annotations

import numpy as np
import torch

from edge_client.dp_sgd import train_dp_sgd
from edge_client.local_privacy import LocalAccountant, round_cost
from edge_client.methods import register
from edge_client.methods.base import ClientMethod, RoundResult, RoundTask
from edge_client.prompts import initial_context
from edge_client.training import accuracy, train_plain
from edge_client.workspace import ClientWorkspace, WorkspaceError
from fedprompt.common.privacy import client_level_mechanism, secure_rng
from fedprompt.common.settings import TrainingSettings


@register
class PromptFLClient(ClientMethod):
    name = "promptfl"

    def __init__(self, workspace: ClientWorkspace) -> None:
        self.workspace = workspace

    def start_context(self, task: RoundTask, settings: TrainingSettings) -> torch.Tensor:
        """The global ctx of the task, or the shared seeded initialisation in round 1."""
        expected = (settings.n_ctx, self.workspace.text_width)
        if "ctx" not in task.tensors:
            return initial_context(*expected, settings.ctx_init_std, settings.seed)
        ctx = task.tensors["ctx"]
        if tuple(ctx.shape) != expected:
            raise WorkspaceError(f"global ctx has shape {tuple(ctx.shape)} but this bundle needs {expected}")
        return torch.from_numpy(np.asarray(ctx, np.float32))

    def run_round(self, task: RoundTask) -> RoundResult:
        settings = TrainingSettings.from_dict(task.settings)
        ws = self.workspace
        train, evaluation, scale = ws.train, ws.evaluation, ws.logit_scale
        encode = ws.text_encoder(settings.n_ctx)
        start = self.start_context(task, settings)
        cost = round_cost(settings, len(train))
        accountant = LocalAccountant(ws.state_dir, settings)
        if cost is not None:
            accountant.spend(cost)  # refuses before any training if the budget cannot afford it
        order = torch.Generator().manual_seed(settings.seed * 1_000_003 + task.round_id)
        if settings.dp == "sample":
            new, stats = train_dp_sgd(
                start, encode, train.features, train.labels, scale, settings, cost.sample_rate, cost.steps
            )
        else:
            new, stats = train_plain(start, encode, train.features, train.labels, scale, settings, order)
        upload = new.numpy()
        if settings.dp == "client":
            update = {"ctx": upload - start.numpy()}
            noised, _ = client_level_mechanism(update, settings.clip, settings.noise_multiplier, secure_rng())
            upload = start.numpy() + noised["ctx"]
        metrics = stats.metrics()
        if len(evaluation):
            metrics["accuracy"] = accuracy(torch.from_numpy(upload), encode, *evaluation.tensors(), scale)
            metrics["received_accuracy"] = accuracy(start, encode, *evaluation.tensors(), scale)
        return RoundResult(
            tensors={"ctx": upload.astype(np.float32)},
            num_examples=len(train),
            metrics=metrics,
            privacy=accountant.report(cost),
        )
