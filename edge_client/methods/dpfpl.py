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
from pathlib import Path

import numpy as np
import torch

from edge_client.methods import register
from edge_client.methods.base import ClientMethod, LocalRound, RoundTask
from edge_client.methods.local_state import load_tensors, save_tensors, state_file
from edge_client.methods.low_rank import factorise
from edge_client.methods.round_parts import received_tensor
from edge_client.prompts import initial_context
from edge_client.training import Params, PromptObjective, TextEncoder
from edge_client.workspace import WorkspaceError
from fedprompt.common.methods import TaskSettings


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


@dataclass
class PersonalRound(LocalRound):
    prompt: PersonalPrompt | None = None
    path: Path | None = None


@register
class DPFPLClient(ClientMethod):
    name = "dpfpl"

    def prepare(self, task: RoundTask, settings: TaskSettings) -> LocalRound:
        ws, core = self.workspace, settings.core
        shape = (core.n_ctx, ws.text_width)
        global_ctx = received_tensor(task, "ctx", shape)
        global_ctx = torch.zeros(shape) if global_ctx is None else global_ctx
        path = state_file(ws.state_dir, self.name, task.run_id)
        saved = load_tensors(path)
        if saved and tuple(saved["local"].shape) != shape:
            raise WorkspaceError(f"{path} holds a local prompt of another shape; remove it knowingly")
        local = (
            torch.from_numpy(saved["local"])
            if saved
            else initial_context(*shape, core.ctx_init_std, core.seed)
        )
        warm_v = torch.from_numpy(saved["v"]) if saved else None
        prompt, theta = PersonalPrompt.start(global_ctx, local, settings.client.rank, warm_v, core.seed)
        objective = PersonalObjective(prompt, ws.text_encoder(core.n_ctx), ws.logit_scale)
        return PersonalRound(task, settings, objective, {"theta": theta}, prompt=prompt, path=path)

    def upload(self, round_: PersonalRound, trained: Params) -> dict[str, np.ndarray]:
        new_global, _, _ = round_.prompt.unpack(trained["theta"])
        return {"ctx": new_global.numpy().copy()}

    def keep(self, round_: PersonalRound, trained: Params) -> None:
        """The local prompt and its right factor (the next round's warm start)."""
        _, _, v = round_.prompt.unpack(trained["theta"])
        save_tensors(round_.path, {"local": round_.prompt.local(trained["theta"]).numpy(), "v": v.numpy()})
