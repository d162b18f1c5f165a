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

import torch

from edge_client.class_heads import ObjectiveHead
from edge_client.dp_sgd import train_dp_sgd
from edge_client.methods import register
from edge_client.methods.base import ClientMethod, RoundResult, RoundTask
from edge_client.methods.round_parts import client_level_upload, global_context, paid_round, round_generator
from edge_client.training import PromptObjective, accuracy, train_plain
from edge_client.workspace import ClientWorkspace
from fedprompt.common.settings import TrainingSettings


@register
class PromptFLClient(ClientMethod):
    name = "promptfl"

    def __init__(self, workspace: ClientWorkspace) -> None:
        self.workspace = workspace

    def start_context(self, task: RoundTask, settings: TrainingSettings) -> torch.Tensor:
        """The global ctx of the task, or the shared seeded initialisation in round 1."""
        return global_context(task, settings, self.workspace.text_width)

    @torch.no_grad()
    def head(self, task: RoundTask) -> ObjectiveHead:
        settings = TrainingSettings.from_dict(task.settings)
        encode = self.workspace.text_encoder(settings.n_ctx)
        objective = PromptObjective.coop(encode, self.workspace.logit_scale)
        return ObjectiveHead(objective, {"ctx": self.start_context(task, settings)})

    def run_round(self, task: RoundTask) -> RoundResult:
        settings = TrainingSettings.from_dict(task.settings)
        ws = self.workspace
        train, evaluation, scale = ws.train, ws.evaluation, ws.logit_scale
        encode = ws.text_encoder(settings.n_ctx)
        start = self.start_context(task, settings)
        accountant, cost = paid_round(ws, settings)
        objective = PromptObjective.coop(encode, scale)
        inputs = (train.features,)
        if settings.dp == "sample":
            new, stats = train_dp_sgd(
                objective, {"ctx": start}, inputs, train.labels, settings, cost.sample_rate, cost.steps
            )
        else:
            order = round_generator(settings, task.round_id)
            new, stats = train_plain(objective, {"ctx": start}, inputs, train.labels, settings, order)
        upload = client_level_upload(start, new["ctx"], settings)
        metrics = stats.metrics()
        if len(evaluation):
            images, labels = evaluation.tensors()
            metrics["accuracy"] = accuracy(objective, {"ctx": torch.from_numpy(upload)}, (images,), labels)
            metrics["received_accuracy"] = accuracy(objective, {"ctx": start}, (images,), labels)
        return RoundResult(
            tensors={"ctx": upload},
            num_examples=len(train),
            metrics=metrics,
            privacy=accountant.report(cost),
        )
