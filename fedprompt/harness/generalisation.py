"""Where FedMVP claims its gain: classes and domains no client trained on, scored on the model
each client is served after the run (`fedprompt predict`'s classifier, rebuilt from the state
folder the run left, as a device would).

Base-to-new (`split.base_classes` B): clients trained on the first B classes only; base accuracy
is measured on held-out images of those classes among those classes, new accuracy on the others
among the others (CoCoOp's protocol), and H is their harmonic mean. Unseen domain
(`split.unseen_shift`): the client's held-out images moved into a domain no client trained in,
scored among all classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from edge_client.class_heads import encoded_features
from edge_client.device_run import load_device_run
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.training import class_logits
from edge_client.workspace import ClientWorkspace, LabelledFeatures
from fedprompt.harness.baselines import zero_shot_text_features

Classifier = Callable[[LabelledFeatures], torch.Tensor]  # a split -> logits [N, K]
SCORES = ("served_base", "served_new", "served_hm", "served_unseen")


def among(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> float:
    """Accuracy on the images of `classes`, choosing among those classes only."""
    chosen = torch.as_tensor(list(classes))
    rows = torch.isin(labels, chosen)
    if not bool(rows.any()):
        return float("nan")
    predicted = chosen[logits[rows][:, chosen].argmax(dim=1)]
    return float((predicted == labels[rows]).float().mean())


def harmonic(base: float, new: float) -> float:
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def scores(
    classify: Classifier, evaluation: LabelledFeatures, unseen: LabelledFeatures | None, base_classes: int
) -> dict[str, float]:
    """The generalisation scores of one client's classifier (only those the split defines)."""
    found: dict[str, float] = {}
    if base_classes:
        logits = classify(evaluation)
        classes = logits.shape[1]
        found["served_base"] = among(logits, evaluation.labels, range(base_classes))
        found["served_new"] = among(logits, evaluation.labels, range(base_classes, classes))
        found["served_hm"] = harmonic(
            found["served_base"], found["served_new"]
        )  # per client; see mean_scores
    if unseen is not None:
        logits = classify(unseen)
        found["served_unseen"] = among(logits, unseen.labels, range(logits.shape[1]))
    return found


def served_classifier(method: str, workspace: ClientWorkspace) -> Classifier:
    """The classifier the finished run left on this device: the method's head, fed by its own
    image side where it has one (FedMVP), else by the cached features."""
    half = CLIENT_METHODS[method](workspace)
    task = load_device_run(workspace.state_dir).next_task()
    head, encoder = half.head(task).eval(), half.image_encoder(task)

    @torch.no_grad()
    def classify(split: LabelledFeatures) -> torch.Tensor:
        if encoder is None:
            return head(split.features)
        return head(encoded_features(encoder.eval(), split.images, workspace.bundle))

    return classify


def zero_shot_classifier(workspace: ClientWorkspace) -> Classifier:
    text = zero_shot_text_features(workspace)
    return lambda split: class_logits(split.features, text, workspace.logit_scale)


def mean_scores(per_client: Sequence[dict[str, float]]) -> dict[str, float]:
    """Client means (clients weighted equally; a client without images of a side is left out),
    H the harmonic mean of the mean base and new accuracies (as the papers form it per data set)."""
    names = per_client[0].keys() if per_client else ()
    means = {name: float(np.nanmean([c[name] for c in per_client])) for name in names}
    if "served_hm" in means:
        means["served_hm"] = harmonic(means["served_base"], means["served_new"])
    return means
