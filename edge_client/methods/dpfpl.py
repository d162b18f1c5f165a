"""DP-FPL, client half (seed 000, Tran et al.): a global prompt averaged by the server plus a local
prompt that never leaves the device.

The prompt a client trains and uses is `global + u @ v + residual`: the local prompt M is
re-factorised before every step as u @ v + residual (`edge_client.methods.low_rank`: one
warm-started power iteration, rank `rank`), the residual held constant, so the step moves the
global prompt and the low-rank factors u, v; afterwards M = u @ v + residual. What travels up:
`{"ctx": [n_ctx, W]}`, the client's new global prompt. Round 1 arrives with no global prompt: it
starts at zero on both halves (so the server needs no torch to know it), and the local prompt gets
CoOp's seeded N(0, ctx_init_std^2) initialisation, so the first personalised prompt is PromptFL's.

Local DP (settings dp = "sample"): DP-SGD over the global prompt and u, v together, packed into one
vector, so each example's gradient is clipped to `clip` over all three JOINTLY and Gaussian noise
of std noise_multiplier * clip is added to every coordinate, on Poisson batches, accounted per step
by the device's opacus accountant with the real sampling rate. The global prompt goes through
DP-SGD too: the local prompt's steps depend on it, so a global prompt trained without noise would
leak the data into the local prompt and void its guarantee. Re-factorisation is post-processing.
Everything the device outputs (the upload and the local prompt) is then DP with respect to its
examples. dp = "client" is refused (it would protect the upload only); dp = "none" trains plainly.
Global DP on the aggregate is the server half's (`aggregator.strategies.dpfpl`).

Where fedprompt differs from the official code (linhhtran/DP-FPL), and why:

- Gradient of the local prompt: the official code builds local_ctx's gradient by hand from the u
  and v gradients, with a sign opposite to the paper's Eq. 4. fedprompt uses autograd on the
  paper's formulation (prompt = global + u @ v + detached residual) and steps u and v themselves.
- Factorisation: the official code draws a fresh random start every step and also orthonormalises
  v, so u @ v is not a projection of the local prompt (its norm is sqrt(r) whatever the prompt's).
  fedprompt warm-starts from the previous v and keeps v = u.T @ M, as the paper describes.
- Clipping: the official code clips the batch-mean gradient (norm 10), which does not bound one
  example's influence, so it is not DP-SGD. fedprompt clips every example's gradient.
- Accounting: the official code adds noise on every batch but sets sigma with T = number of rounds
  (advanced composition, q = 1). fedprompt's accountant counts every noisy step at its real
  Poisson rate.
- Protocol: the official simulation averages the global prompt's gradient across clients after
  every mini-batch. Over a network fedprompt runs `local_epochs` locally and averages the global
  prompt once per round (FedAvg).

Sent in the clear beside the DP upload, as for every method: the example count and the metrics
(accuracy of the personalised prompt on the local hold-out before and after the round).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_client.class_heads import ObjectiveHead
from edge_client.dp_sgd import train_dp_sgd
from edge_client.local_privacy import RoundCost
from edge_client.methods import register
from edge_client.methods.base import ClientMethod, RoundResult, RoundTask
from edge_client.methods.local_state import load_tensors, save_tensors, state_file
from edge_client.methods.low_rank import factorise
from edge_client.methods.round_parts import paid_round, received_tensor, round_generator
from edge_client.prompts import initial_context
from edge_client.training import (
    Params,
    PromptObjective,
    TextEncoder,
    TrainStats,
    accuracy,
    train_plain,
)
from edge_client.workspace import ClientWorkspace, LabelledFeatures, WorkspaceError
from fedprompt.common.settings import SettingsError, TrainingSettings


@dataclass
class PersonalPrompt:
    """The trainable parts packed into one vector theta = [global, u, v] (flattened), so that DP-SGD
    clips each example's gradient over all of them jointly; the residual is a constant beside it."""

    n_ctx: int
    width: int
    rank: int
    residual: torch.Tensor

    @classmethod
    def start(
        cls, global_ctx: torch.Tensor, local: torch.Tensor, rank: int, warm_v: torch.Tensor | None, seed: int
    ) -> tuple[PersonalPrompt, torch.Tensor]:
        """The parts and the packed theta, the local prompt factorised once."""
        factors = factorise(local, rank, warm_v, torch.Generator().manual_seed(seed))
        prompt = cls(local.shape[0], local.shape[1], rank, factors.residual)
        return prompt, torch.cat([global_ctx.flatten(), factors.u.flatten(), factors.v.flatten()])

    def unpack(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of theta as (global [n_ctx, W], u [n_ctx, r], v [r, W])."""
        n, w, r = self.n_ctx, self.width, self.rank
        g, u, v = theta.split([n * w, n * r, r * w])
        return g.view(n, w), u.view(n, r), v.view(r, w)

    def prompt(self, theta: torch.Tensor) -> torch.Tensor:
        """global + u @ v + residual: differentiable in theta, not in the residual."""
        g, u, v = self.unpack(theta)
        return g + u @ v + self.residual

    def local(self, theta: torch.Tensor) -> torch.Tensor:
        _, u, v = self.unpack(theta)
        return u @ v + self.residual

    def refactorise(self, theta: torch.Tensor) -> None:
        """Factorise the current local prompt again (warm start from v), writing the new u and v
        into theta in place; the local prompt itself is unchanged by this."""
        _, u, v = self.unpack(theta)
        factors = factorise(self.local(theta), self.rank, v.clone())
        u.copy_(factors.u)
        v.copy_(factors.v)
        self.residual = factors.residual


class PersonalObjective(PromptObjective):
    """CoOp's loss of the personalised prompt global + u @ v + residual, trained as the packed
    {"theta": [global, u, v]}, re-factorised before every step."""

    def __init__(self, prompt: PersonalPrompt, encode: TextEncoder, logit_scale: float) -> None:
        super().__init__(lambda params: encode(prompt.prompt(params["theta"])), logit_scale)
        self.prompt = prompt

    def before_step(self, params: Params) -> None:
        self.prompt.refactorise(params["theta"])


def train_personal(
    prompt: PersonalPrompt,
    theta: torch.Tensor,
    encode: TextEncoder,
    train: LabelledFeatures,
    logit_scale: float,
    settings: TrainingSettings,
    cost: RoundCost | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, TrainStats]:
    """One round of local training of theta, re-factorising before every step: DP-SGD when the
    round has a local DP cost, plain otherwise. Returns the new theta."""
    objective = PersonalObjective(prompt, encode, logit_scale)
    features, labels = train.tensors()
    if cost is not None:
        trained, stats = train_dp_sgd(
            objective, {"theta": theta}, (features,), labels, settings, cost.sample_rate, cost.steps
        )
    else:
        trained, stats = train_plain(objective, {"theta": theta}, (features,), labels, settings, generator)
    return trained["theta"], stats


@register
class DPFPLClient(ClientMethod):
    name = "dpfpl"

    def __init__(self, workspace: ClientWorkspace) -> None:
        self.workspace = workspace

    def start(
        self, task: RoundTask, settings: TrainingSettings
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(global prompt, local prompt, warm-start v) a round starts from: the task's global prompt
        (zero in round 1) and the device's saved local prompt (CoOp's seeded start at first)."""
        shape = (settings.n_ctx, self.workspace.text_width)
        global_ctx = received_tensor(task, "ctx", shape)
        global_ctx = torch.zeros(shape) if global_ctx is None else global_ctx
        path = state_file(self.workspace.state_dir, self.name, task.run_id)
        saved = load_tensors(path)
        if saved and tuple(saved["local"].shape) != shape:
            raise WorkspaceError(f"{path} holds a local prompt of another shape; remove it knowingly")
        local = (
            torch.from_numpy(saved["local"])
            if saved
            else initial_context(*shape, settings.ctx_init_std, settings.seed)
        )
        return global_ctx, local, torch.from_numpy(saved["v"]) if saved else None

    @torch.no_grad()
    def head(self, task: RoundTask) -> ObjectiveHead:
        """CoOp's classifier of the personalised prompt global + local."""
        settings = TrainingSettings.from_dict(task.settings)
        global_ctx, local, _ = self.start(task, settings)
        objective = PromptObjective.coop(
            self.workspace.text_encoder(settings.n_ctx), self.workspace.logit_scale
        )
        return ObjectiveHead(objective, {"ctx": global_ctx + local})

    def run_round(self, task: RoundTask) -> RoundResult:
        settings = TrainingSettings.from_dict(task.settings)
        if settings.dp == "client":
            raise SettingsError(
                'dpfpl applies local DP as DP-SGD on its prompts: set dp = "sample" (or "none")'
            )
        if settings.rank > settings.n_ctx:
            raise SettingsError(f"setting 'rank' must be at most n_ctx ({settings.n_ctx}) for dpfpl")
        ws = self.workspace
        global_ctx, local, warm_v = self.start(task, settings)
        path = state_file(ws.state_dir, self.name, task.run_id)
        accountant, cost = paid_round(ws, settings)
        prompt, theta = PersonalPrompt.start(global_ctx, local, settings.rank, warm_v, settings.seed)
        encode, scale = ws.text_encoder(settings.n_ctx), ws.logit_scale
        metrics: dict[str, float] = {}
        held_out = PromptObjective.coop(encode, scale)
        images, labels = ws.evaluation.tensors()
        if len(ws.evaluation):
            received = {"ctx": prompt.prompt(theta)}
            metrics["received_accuracy"] = accuracy(held_out, received, (images,), labels)
        theta, stats = train_personal(
            prompt, theta, encode, ws.train, scale, settings, cost, round_generator(settings, task.round_id)
        )
        new_global, _, v = prompt.unpack(theta)
        save_tensors(path, {"local": prompt.local(theta).numpy(), "v": v.numpy()})
        metrics.update(stats.metrics())
        if len(ws.evaluation):
            metrics["accuracy"] = accuracy(held_out, {"ctx": prompt.prompt(theta)}, (images,), labels)
        return RoundResult(
            tensors={"ctx": new_global.numpy().copy()},
            num_examples=len(ws.train),
            metrics=metrics,
            privacy=accountant.report(cost),
        )
