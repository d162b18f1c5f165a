"""The two baselines every comparison needs, shared by the demo and the experiment harness.

Zero-shot: the hand prompt "a photo of a {class}." through the bundle's frozen text tower, no
training. Local-only: each client trains PromptFL's client half alone, round after round, starting
each round from its own previous prompt; nothing leaves the device, so it is what a client gets
without federation for the same local budget (same settings, same number of rounds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from edge_client.methods.base import RoundResult, RoundTask
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.training import class_logits
from edge_client.workspace import ClientWorkspace
from export.pretrain import ZERO_SHOT_TEMPLATE
from fedprompt.common.methods import TaskSettings
from fedprompt.common.settings import TrainingSettings

LOCAL_ONLY_METHOD = "promptfl"  # the client half trained alone: CoOp on local data only


@torch.no_grad()
def zero_shot_text_features(workspace: ClientWorkspace, template: str = ZERO_SHOT_TEMPLATE) -> torch.Tensor:
    """Text features [K, D] of the hand prompt for every class (names read as CoOp reads them)."""
    texts = [template.format(name.replace("_", " ")) for name in workspace.class_names]
    return workspace.tower.encode_token_ids(workspace.bundle.tokenizer()(texts).to(torch.int64))


@torch.no_grad()
def zero_shot_accuracy(workspace: ClientWorkspace, template: str = ZERO_SHOT_TEMPLATE) -> float:
    """Top-1 accuracy of the hand prompt on the workspace's evaluation images."""
    features, labels = workspace.evaluation.tensors()
    if len(labels) == 0:
        raise ValueError("zero-shot accuracy needs evaluation images")
    logits = class_logits(features, zero_shot_text_features(workspace, template), workspace.logit_scale)
    return float((logits.argmax(dim=1) == labels).float().mean())


def local_only_rounds(
    workspaces: Sequence[ClientWorkspace], settings: TrainingSettings, rounds: int
) -> Iterator[list[RoundResult]]:
    """Yield, round by round, every client's result of training alone. Each client keeps its own
    prompt between rounds (PromptFL's client half uploads its new context, which here is fed back
    to the same client instead of being averaged); a client starts from the shared seeded init."""
    clients = [CLIENT_METHODS[LOCAL_ONLY_METHOD](workspace) for workspace in workspaces]
    own: list[dict[str, np.ndarray]] = [{} for _ in workspaces]
    for round_id in range(1, rounds + 1):
        results = []
        for index, client in enumerate(clients):
            task_settings = TaskSettings(LOCAL_ONLY_METHOD, settings).to_dict()
            task = RoundTask("local-only", round_id, LOCAL_ONLY_METHOD, task_settings, own[index], 0.0)
            result = client.run_round(task)
            own[index] = result.tensors
            results.append(result)
        yield results
