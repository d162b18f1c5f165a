"""How good is the model each client is served once a federated run is over?

After the last round each client is handed what the finished run serves it (the global state plus
the method's per-client extras, encoded as a task would travel) and classifies its held-out set
with the method's own `head` (the classifier `fedprompt predict` uses on a device). Nothing is
trained or sent; the served model is kept in the client's state folder as a device keeps it, so
`fedprompt predict` on that folder gives the same accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from aggregator.rounds import RoundCoordinator
from edge_client.class_heads import encoded_features, head_accuracy
from edge_client.device_run import save_served, save_task
from edge_client.methods.base import RoundTask
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.workspace import ClientWorkspace
from fedprompt.common.codec import decode_tensor_set


def served_accuracies(
    coordinator: RoundCoordinator, workspaces: Sequence[ClientWorkspace], client_ids: Sequence[str]
) -> list[float]:
    """Per client, the held-out accuracy of the model the finished run serves it."""
    method = coordinator.config.method.name
    settings = json.loads(coordinator.client_settings_json)
    accuracies = []
    for client_id, workspace in zip(client_ids, workspaces, strict=True):
        round_id, payload = coordinator.served_model(client_id)
        served = decode_tensor_set(payload)
        task = RoundTask(coordinator.run_id, round_id + 1, method, settings, served, 0.0)
        save_task(workspace.state_dir, task)
        save_served(workspace.state_dir, coordinator.run_id, round_id, served)
        half = CLIENT_METHODS[method](workspace)
        head, encoder = half.head(task), half.image_encoder(task)
        features, labels = workspace.evaluation.tensors()
        if encoder is not None:  # a method with its own image side classifies the images themselves
            features = encoded_features(encoder.eval(), workspace.evaluation.images, workspace.bundle)
        accuracies.append(head_accuracy(head, features, labels))
    return accuracies
