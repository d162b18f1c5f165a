"""SecFPP, client half (seed 001, Hou et al.; no public code): a hierarchical prompt of a
domain-level part, shared with the client's cluster, and a class-level part that never leaves the
device.

The prompt of class c is `domain + class_level[c]`: the domain-level context [n_ctx, W] plus a
class-specific residual [C, n_ctx, W] (CoOp's class-specific context, zero at the start), so label
skew is absorbed on the device and the shared part adapts to the image domain. A round: the client
joins the cluster whose public centroid is nearest to its descriptor
(`edge_client.methods.domain_clusters`), starts from that cluster's domain prompt, trains both parts
(DP-SGD over both jointly with dp = "sample", so every output of the device is DP with respect to
its examples; dp = "client" is refused, it would protect the upload only), and uploads its new
domain prompt, a count, its descriptor and its squared norm in its cluster's slot of a
`clusters`-slot vector. In its first round a client starts from the run's shared initialisation
instead, and its descriptor is the projection of that round's domain-prompt update.

The upload is only ever securely summed (the server half requires secure aggregation); the class
level prompt, the descriptor and the cluster stay in the method's state file. `metrics["cluster"]`
stays on the device too: secure aggregation sends only accuracies, inside the sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_client.class_heads import ObjectiveHead
from edge_client.dp_sgd import train_dp_sgd
from edge_client.methods import register
from edge_client.methods.base import ClientMethod, RoundResult, RoundTask
from edge_client.methods.domain_clusters import descriptor, nearest, slot_upload
from edge_client.methods.local_state import load_tensors, save_tensors, state_file
from edge_client.methods.round_parts import paid_round, round_generator
from edge_client.prompts import initial_context
from edge_client.training import PromptObjective, TextEncoder, accuracy, train_plain
from edge_client.workspace import ClientWorkspace, WorkspaceError
from fedprompt.common.settings import SettingsError, TrainingSettings


@dataclass(frozen=True)
class HierarchicalPrompt:
    """theta = [domain (n_ctx * W), class level (C * n_ctx * W)], one vector, so that DP-SGD clips
    each example's gradient over both parts jointly."""

    n_ctx: int
    width: int
    classes: int

    def pack(self, domain: torch.Tensor, class_level: torch.Tensor) -> torch.Tensor:
        return torch.cat([domain.flatten(), class_level.flatten()])

    def unpack(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.n_ctx * self.width
        domain, class_level = theta.split([size, self.classes * size])
        return domain.view(self.n_ctx, self.width), class_level.view(self.classes, self.n_ctx, self.width)

    def encoder(self, encode: TextEncoder) -> TextEncoder:
        """theta -> class text features, class c through `domain + class_level[c]`."""

        def text_features(theta: torch.Tensor) -> torch.Tensor:
            domain, class_level = self.unpack(theta)
            return encode(domain.unsqueeze(0) + class_level)

        return text_features


@dataclass(frozen=True)
class RoundStart:
    """Where a SecFPP round starts on this device."""

    prompt: HierarchicalPrompt
    path: Path
    class_level: torch.Tensor
    point: np.ndarray | None
    initial: torch.Tensor
    clusters: tuple[np.ndarray, np.ndarray] | None
    slot: int | None
    domain: torch.Tensor


@register
class SecFPPClient(ClientMethod):
    name = "secfpp"

    def __init__(self, workspace: ClientWorkspace) -> None:
        self.workspace = workspace

    def received(self, task: RoundTask, settings: TrainingSettings) -> tuple[np.ndarray, np.ndarray] | None:
        """(domain prompts [K, n_ctx, W], centroids [K, d]), or None before round 1's sum exists."""
        if "domain" not in task.tensors:
            return None
        domain, centroids = task.tensors["domain"], task.tensors.get("centroids")
        shape = (settings.n_ctx, self.workspace.text_width)
        clusters = len(domain)
        if (
            centroids is None
            or not 1 <= clusters <= settings.clusters
            or tuple(domain.shape[1:]) != shape
            or tuple(centroids.shape) != (clusters, settings.cluster_dim)
        ):
            got = None if centroids is None else centroids.shape
            raise WorkspaceError(
                f"received domain prompts {domain.shape} and centroids {got}; expected "
                f"[1..{settings.clusters}, {shape}] and [K, {settings.cluster_dim}]"
            )
        return np.asarray(domain, np.float32), np.asarray(centroids, np.float64)

    def start(self, task: RoundTask, settings: TrainingSettings) -> RoundStart:
        """The device's saved parts and the domain prompt of its nearest cluster (or the shared
        initialisation before it has a descriptor or the server has clusters)."""
        ws = self.workspace
        prompt = HierarchicalPrompt(settings.n_ctx, ws.text_width, len(ws.class_names))
        path = state_file(ws.state_dir, self.name, task.run_id)
        saved = load_tensors(path)
        shape = (prompt.classes, prompt.n_ctx, prompt.width)
        if saved and tuple(saved["class_level"].shape) != shape:
            raise WorkspaceError(f"{path} holds class-level prompts of another shape; remove it knowingly")
        class_level = torch.from_numpy(saved["class_level"]) if saved else torch.zeros(shape)
        point = saved.get("descriptor")
        initial = initial_context(prompt.n_ctx, prompt.width, settings.ctx_init_std, settings.seed)
        clusters = self.received(task, settings)
        slot = None if point is None or clusters is None else nearest(point, clusters[1])
        domain = initial if slot is None else torch.from_numpy(clusters[0][slot].copy())
        return RoundStart(prompt, path, class_level, point, initial, clusters, slot, domain)

    def objective(self, settings: TrainingSettings, prompt: HierarchicalPrompt) -> PromptObjective:
        """CoOp's loss with class c through `domain + class_level[c]`, trained as {"theta"}."""
        encode = prompt.encoder(self.workspace.text_encoder(settings.n_ctx))
        return PromptObjective(lambda params: encode(params["theta"]), self.workspace.logit_scale)

    def head(self, task: RoundTask) -> ObjectiveHead:
        """Class c through the nearest cluster's domain prompt plus the device's class-level c."""
        settings = TrainingSettings.from_dict(task.settings)
        begin = self.start(task, settings)
        params = {"theta": begin.prompt.pack(begin.domain, begin.class_level)}
        return ObjectiveHead(self.objective(settings, begin.prompt), params)

    def run_round(self, task: RoundTask) -> RoundResult:
        settings = TrainingSettings.from_dict(task.settings)
        if settings.dp == "client":
            raise SettingsError(
                'secfpp applies local DP as DP-SGD on its prompts: set dp = "sample" (or "none")'
            )
        ws = self.workspace
        begin = self.start(task, settings)
        prompt, path, class_level, point = begin.prompt, begin.path, begin.class_level, begin.point
        initial, clusters, slot, start = begin.initial, begin.clusters, begin.slot, begin.domain

        accountant, cost = paid_round(ws, settings)
        objective = self.objective(settings, prompt)
        params = {"theta": prompt.pack(start, class_level)}
        metrics: dict[str, float] = {}
        images, held_out_labels = ws.evaluation.tensors()
        if len(ws.evaluation):
            metrics["received_accuracy"] = accuracy(objective, params, (images,), held_out_labels)
        features, labels = ws.train.tensors()
        if cost is not None:
            params, stats = train_dp_sgd(
                objective, params, (features,), labels, settings, cost.sample_rate, cost.steps
            )
        else:
            order = round_generator(settings, task.round_id)
            params, stats = train_plain(objective, params, (features,), labels, settings, order)
        domain, class_level = prompt.unpack(params["theta"])
        if point is None:  # the first round started from the shared initialisation
            point = descriptor((domain - initial).numpy(), settings.seed, settings.cluster_dim)
        if slot is None:
            slot = 0 if clusters is None else nearest(point, clusters[1])
        save_tensors(path, {"class_level": class_level.numpy(), "descriptor": point.astype(np.float32)})
        metrics.update(stats.metrics())
        if len(ws.evaluation):
            metrics["accuracy"] = accuracy(objective, params, (images,), held_out_labels)
        metrics["cluster"] = float(slot)
        return RoundResult(
            tensors=slot_upload(slot, settings.clusters, domain.numpy(), point),
            num_examples=len(ws.train),
            metrics=metrics,
            privacy=accountant.report(cost),
        )
