"""SecFPP, client half (seed 001, Hou et al.; no public code): a hierarchical prompt of a
domain-level part, shared with the client's cluster, and a class-level part that never leaves the
device.

The prompt of class c is `domain + class_level[c]`: the domain-level context [n_ctx, W] plus a
class-specific residual [C, n_ctx, W] (CoOp's class-specific context, zero at the start), so label
skew is absorbed on the device and the shared part adapts to the image domain. A round: the client
joins the cluster whose public centroid is nearest to its descriptor
(`edge_client.methods.domain_clusters`), starts from that cluster's domain prompt, trains both parts
(DP-SGD over both jointly with dp = "sample", so every output of the device is DP with respect to
its examples; its spec refuses dp = "client", which would protect the upload only), and uploads
its new domain prompt, a count, its descriptor and its squared norm in its cluster's slot of a
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

from edge_client.methods import register
from edge_client.methods.base import ClientMethod, LocalRound, RoundTask
from edge_client.methods.domain_clusters import descriptor, nearest, slot_upload
from edge_client.methods.local_state import load_tensors, save_tensors, state_file
from edge_client.prompts import initial_context
from edge_client.training import Params, PromptObjective, TextEncoder
from edge_client.workspace import WorkspaceError
from fedprompt.common.methods import TaskSettings


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


@dataclass
class SecFPPRound(LocalRound):
    prompt: HierarchicalPrompt | None = None
    path: Path | None = None
    initial: torch.Tensor | None = None  # the run's shared initialisation (the first round's start)
    point: np.ndarray | None = None  # the client's descriptor, once known
    clusters: tuple[np.ndarray, np.ndarray] | None = None
    slot: int | None = None


@register
class SecFPPClient(ClientMethod):
    name = "secfpp"

    def received(self, task: RoundTask, settings: TaskSettings) -> tuple[np.ndarray, np.ndarray] | None:
        """(domain prompts [K, n_ctx, W], centroids [K, d]), or None when the task has none."""
        if "domain" not in task.tensors:
            return None
        domain, centroids = task.tensors["domain"], task.tensors.get("centroids")
        own = settings.client
        shape = (settings.core.n_ctx, self.workspace.text_width)
        clusters = len(domain)
        if (
            centroids is None
            or not 1 <= clusters <= own.clusters
            or tuple(domain.shape[1:]) != shape
            or tuple(centroids.shape) != (clusters, own.cluster_dim)
        ):
            got = None if centroids is None else centroids.shape
            raise WorkspaceError(
                f"received domain prompts {domain.shape} and centroids {got}; expected "
                f"[1..{own.clusters}, {shape}] and [K, {own.cluster_dim}]"
            )
        return np.asarray(domain, np.float32), np.asarray(centroids, np.float64)

    def prepare(self, task: RoundTask, settings: TaskSettings) -> LocalRound:
        ws, core = self.workspace, settings.core
        prompt = HierarchicalPrompt(core.n_ctx, ws.text_width, len(ws.class_names))
        path = state_file(ws.state_dir, self.name, task.run_id)
        saved = load_tensors(path)
        shape = (prompt.classes, prompt.n_ctx, prompt.width)
        if saved and tuple(saved["class_level"].shape) != shape:
            raise WorkspaceError(f"{path} holds class-level prompts of another shape; remove it knowingly")
        class_level = torch.from_numpy(saved["class_level"]) if saved else torch.zeros(shape)
        point = saved.get("descriptor")
        initial = initial_context(prompt.n_ctx, prompt.width, core.ctx_init_std, core.seed)
        clusters = self.received(task, settings)
        slot = None if point is None or clusters is None else nearest(point, clusters[1])
        start = initial if slot is None else torch.from_numpy(clusters[0][slot].copy())
        encode = prompt.encoder(ws.text_encoder(core.n_ctx))
        objective = PromptObjective(lambda params: encode(params["theta"]), ws.logit_scale)
        params = {"theta": prompt.pack(start, class_level)}
        return SecFPPRound(
            task,
            settings,
            objective,
            params,
            prompt=prompt,
            path=path,
            initial=initial,
            point=point,
            clusters=clusters,
            slot=slot,
        )

    def upload(self, round_: SecFPPRound, trained: Params) -> dict[str, np.ndarray]:
        """The slotted upload; a first round's descriptor is the projection of its domain update."""
        own = round_.settings.client
        domain, _ = round_.prompt.unpack(trained["theta"])
        if round_.point is None:  # the first round started from the shared initialisation
            update = (domain - round_.initial).numpy()
            round_.point = descriptor(update, round_.settings.core.seed, own.cluster_dim)
        if round_.slot is None:
            round_.slot = 0 if round_.clusters is None else nearest(round_.point, round_.clusters[1])
        round_.metrics["cluster"] = float(round_.slot)  # stays on the device (see the module's docstring)
        return slot_upload(round_.slot, own.clusters, domain.numpy(), round_.point)

    def keep(self, round_: SecFPPRound, trained: Params) -> None:
        _, class_level = round_.prompt.unpack(trained["theta"])
        point = round_.point.astype(np.float32)
        save_tensors(round_.path, {"class_level": class_level.numpy(), "descriptor": point})
