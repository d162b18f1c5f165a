"""pFedMoAP, client half (seed 003, Luo et al.): a local prompt mixed with downloaded non-local
prompt experts by a local attention gating network (`edge_client.methods.moe_gating`).

A round: the local prompt starts at the received global prompt (the server's FedAvg; round 1:
the shared seeded CoOp initialisation); the task may also carry `experts` [E, n_ctx, W], the K-1
pool prompts nearest to this client's last upload (none on a client's first round, which then
trains its prompt alone, as in pFedMoAP). The experts' text features are computed once for the
round, without gradients; the local prompt and the gating network train together under the
mixture logits. What travels up: `{"ctx": [n_ctx, W]}`, the new local prompt (16 KB at 16x512 in
fp16); under client-level DP it is clipped and noised like PromptFL's upload. The gating network
never leaves the device: it is kept in the workspace's state folder across rounds and restarts.
Sample-level DP-SGD is not offered: the gating network would need per-example gradients too.

Metrics (in the clear, like every method's): `accuracy` of the device's personalised model (the
trained local prompt, the experts and the gating network) on the local hold-out, and
`received_accuracy` of the model the round starts from (the global prompt as local prompt, with
this round's experts and the gating network as saved).

Where fedprompt differs from the official code (ljaiverson/pFedMoAP): its KNN branch is broken
(top-k on a list, a wrong index map; with 10 clients it silently uses all others); here the server
picks exactly the K-1 nearest by L2 (`aggregator.strategies.expert_pool`). The official
simulation re-encodes prompts through the full 77-token tower; here features are cut after EOT.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from edge_client.methods import register
from edge_client.methods.base import ClientMethod, LocalRound, RoundTask
from edge_client.methods.local_state import load_tensors, save_tensors, state_file
from edge_client.methods.moe_gating import AttentionGating, FeatureSubsampler, expert_features, mixture_logits
from edge_client.methods.round_parts import client_level_upload, global_context
from edge_client.training import Inputs, Objective, Params, TextEncoder
from edge_client.workspace import WorkspaceError
from fedprompt.common.methods import TaskSettings

GATING = "gating."  # prefix of the gating network's tensors among the trainable ones


class MixtureObjective(Objective):
    """Cross-entropy of the mixture logits; trainable: the local prompt `ctx` and, once there are
    experts, the gating network's tensors (`gating.<name>`), applied functionally."""

    def __init__(
        self,
        encode: TextEncoder,
        experts: torch.Tensor | None,
        gating: AttentionGating,
        subsample: FeatureSubsampler,
        logit_scale: float,
        mixture_lambda: float,
    ) -> None:
        self.encode, self.experts, self.gating, self.subsample = encode, experts, gating, subsample
        self.logit_scale, self.mixture_lambda = logit_scale, mixture_lambda

    def gating_params(self) -> Params:
        return {GATING + name: p.detach() for name, p in self.gating.named_parameters()}

    def keep_gating(self, params: Params) -> bool:
        """Load the trained gating tensors back into the network; False when none trained."""
        trained = {name[len(GATING) :]: t for name, t in params.items() if name.startswith(GATING)}
        if trained:
            self.gating.load_state_dict(trained)
        return bool(trained)

    def frozen(self, params: Params) -> Params:
        """The gating tensors loaded into the network, so the classifier calls it directly."""
        self.keep_gating(params)
        self.gating.requires_grad_(False)
        return {name: t for name, t in params.items() if not name.startswith(GATING)}

    def shared(self, params: Params) -> torch.Tensor:
        return self.encode(params["ctx"])

    def classify(self, shared: torch.Tensor, params: Params, inputs: Inputs) -> torch.Tensor:
        """Mixture logits; the gating network runs on the gating tensors among `params`, or on its
        own when there are none (a frozen classifier)."""
        gating = {name[len(GATING) :]: t for name, t in params.items() if name.startswith(GATING)}

        def attend(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            if not gating:
                return self.gating(queries, keys)
            return functional_call(self.gating, gating, (queries, keys))

        return mixture_logits(
            inputs[0], shared, self.experts, attend, self.subsample, self.logit_scale, self.mixture_lambda
        )


@register
class PFedMoAPClient(ClientMethod):
    name = "pfedmoap"

    def received_experts(self, task: RoundTask, settings: TaskSettings) -> torch.Tensor | None:
        """[E, n_ctx, W] with 1 <= E <= K-1, or None when the server sent no experts."""
        if "experts" not in task.tensors:
            return None
        experts = task.tensors["experts"]
        prompt = (settings.core.n_ctx, self.workspace.text_width)
        count = settings.client.experts
        if experts.ndim != 3 or tuple(experts.shape[1:]) != prompt or not 1 <= len(experts) < count:
            raise WorkspaceError(
                f"received experts of shape {experts.shape}; expected [1..{count - 1}, {prompt}]"
            )
        return torch.from_numpy(np.asarray(experts, np.float32))

    def gating(self, task: RoundTask, settings: TaskSettings, width: int) -> AttentionGating:
        """This device's gating network: the saved one, or a fresh seeded one."""
        own = settings.client
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.core.seed)
            gating = AttentionGating(width, own.gating_heads, own.gating_scaling)
        path = state_file(self.workspace.state_dir, self.name, task.run_id)
        saved = load_tensors(path)
        if saved:
            try:
                gating.load_state_dict({name: torch.from_numpy(t) for name, t in saved.items()})
            except RuntimeError:
                raise WorkspaceError(
                    f"{path} holds a gating network of other settings; remove it knowingly"
                ) from None
        return gating

    def prepare(self, task: RoundTask, settings: TaskSettings) -> LocalRound:
        ws, core, own = self.workspace, settings.core, settings.client
        encode = ws.text_encoder(core.n_ctx)
        start = global_context(task, core, ws.text_width)
        received = self.received_experts(task, settings)
        subsample = FeatureSubsampler(ws.bundle.embed_dim, own.gating_dim, own.gating_heads)
        gating = self.gating(task, settings, subsample.width)
        experts = None if received is None else expert_features(encode, received, subsample)
        objective = MixtureObjective(encode, experts, gating, subsample, ws.logit_scale, own.mixture_lambda)
        params = {"ctx": start} if experts is None else {"ctx": start, **objective.gating_params()}
        metrics = {"experts": 0.0 if received is None else float(len(received))}
        return LocalRound(task, settings, objective, params, metrics)

    def upload(self, round_: LocalRound, trained: Params) -> dict[str, np.ndarray]:
        return {"ctx": client_level_upload(round_.params["ctx"], trained["ctx"], round_.settings.core)}

    def keep(self, round_: LocalRound, trained: Params) -> None:
        """The gating network, once it has trained (a first round without experts trains none)."""
        objective: MixtureObjective = round_.objective
        if objective.keep_gating(trained):
            gating = {name: t.detach().numpy() for name, t in objective.gating.state_dict().items()}
            save_tensors(state_file(self.workspace.state_dir, self.name, round_.task.run_id), gating)
