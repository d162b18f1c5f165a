"""How good is the model each client is served once a federated run is over?

Every method already measures it: `metrics["received_accuracy"]` is the accuracy of what a client
starts a round from (PromptFL: the global prompt; DP-FPL: the global prompt with the client's
local low-rank prompt; pFedMoAP: the global prompt as local prompt with its experts and gating).
So after the last round each client is handed the task of a would-be next round, built by the
server half exactly as the coordinator builds it, and runs it on a throwaway copy of its state
folder; only that metric is kept, the training and the copy are discarded, nothing is sent.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from aggregator.rounds import RoundCoordinator
from edge_client.methods.base import RoundTask
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.workspace import ClientWorkspace
from fedprompt.common.codec import decode_tensor_set, encode_tensor_set
from fedprompt.common.privacy import BudgetExceeded


def served_accuracies(
    coordinator: RoundCoordinator,
    workspaces: Sequence[ClientWorkspace],
    client_ids: Sequence[str],
    task_encoding: str,
    scratch: Path,
) -> list[float | None]:
    """Per client, the held-out accuracy of the model the finished run serves it (None when the
    method reports no `received_accuracy` or the client's privacy budget refuses another round)."""
    method = coordinator.config.method.name
    settings = json.loads(coordinator.client_settings_json)
    accuracies: list[float | None] = []
    for client_id, workspace in zip(client_ids, workspaces, strict=True):
        served = coordinator.strategy.tensors_for_client(coordinator.global_state, client_id)
        tensors = decode_tensor_set(encode_tensor_set(served, task_encoding))  # as it would travel
        task = RoundTask(coordinator.run_id, coordinator.committed + 1, method, settings, tensors, 0.0)
        copy = scratch / client_id
        shutil.copytree(workspace.state_dir, copy)
        trial = ClientWorkspace(
            workspace.bundle,
            workspace.tower,
            workspace.class_names,
            workspace.train,
            workspace.evaluation,
            copy,
        )
        try:
            accuracies.append(CLIENT_METHODS[method](trial).run_round(task).metrics.get("received_accuracy"))
        except BudgetExceeded:
            accuracies.append(None)
        finally:
            shutil.rmtree(copy)
    return accuracies
