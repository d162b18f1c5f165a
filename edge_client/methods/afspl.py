"""AFSPL, client half (seed 002): soft prompts for the frozen captioner (CLIP image features ->
projection -> T5), fused from a federated global prompt and parts that never leave the device.

The prompt of an image with feature f is w_g * global + w_l * local + w_m * modality(f), (w_g,
w_l, w_m) = softmax(gate(f)) (`edge_client.caption_training.fused_prompts`); with `gate = "none"`
it is the global prompt alone. A round trains every part (`CaptionObjective`, the shared plain or
DP-SGD loop of the template), keeps the local prompt, the gate and the modality generator in the
state folder, and uploads only the K rows of the global prompt's update (new - received) with the
largest L2 norm and their row numbers (`edge_client.row_upload`). Under dp = "client" the whole
update is clipped and noised first and the rows are chosen from the noisy update; under dp =
"sample" every trained tensor went through DP-SGD. Either way the choice is post-processing of
the DP output, so the row numbers are public.

The device's captioner after a round (trained global prompt + its local parts) is written to
`STATE/caption_prompt.npz`, which `fedprompt caption` reads. Sent in the clear beside the upload:
the example count and the metrics (the hold-out's mean caption loss before and after the round).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edge_client.caption_prompts import save_prompt_parts
from edge_client.caption_training import CaptionObjective, init_fused
from edge_client.caption_workspace import CaptionedFeatures, CaptionWorkspace
from edge_client.methods import register
from edge_client.methods.base import ClientMethod, LocalRound, RoundTask
from edge_client.methods.local_state import load_tensors, save_tensors, state_file
from edge_client.methods.round_parts import received_tensor
from edge_client.row_upload import top_k_rows
from edge_client.training import Inputs, Objective, Params
from edge_client.workspace import WorkspaceError
from fedprompt.common.methods import TaskSettings
from fedprompt.common.privacy import client_level_mechanism, secure_rng


@dataclass
class CaptionRound(LocalRound):
    received: torch.Tensor | None = None  # the global prompt as sent
    path: Path | None = None


@register
class AFSPLClient(ClientMethod):
    name = "afspl"
    workspace: CaptionWorkspace

    def __init__(self, workspace: CaptionWorkspace) -> None:
        if not isinstance(workspace, CaptionWorkspace):
            raise WorkspaceError(
                "method afspl trains caption prompts: --data must be a folder with captions.txt"
            )
        super().__init__(workspace)

    def prepare(self, task: RoundTask, settings: TaskSettings) -> LocalRound:
        ws, client = self.workspace, settings.client
        shape = (client.prompt_tokens, ws.captioner.d_model)
        received = received_tensor(task, "global", shape)
        if received is None:
            raise WorkspaceError("the task carries no global prompt")
        params: Params = {"global": received.clone()}
        path = state_file(ws.state_dir, self.name, task.run_id)
        if client.gate == "softmax":
            saved = load_tensors(path)
            fresh = init_fused(
                received,
                ws.bundle.embed_dim,
                client.prompt_init_std,
                torch.Generator().manual_seed(settings.core.seed),
            )
            if saved and {k: v.shape for k, v in saved.items()} != {k: tuple(fresh[k].shape) for k in saved}:
                raise WorkspaceError(
                    f"{path} holds local caption prompts of another shape; remove it knowingly"
                )
            local = {k: torch.from_numpy(v) for k, v in saved.items()} if saved else fresh
            params |= {k: v for k, v in local.items() if k != "global"}
        objective = CaptionObjective(ws.captioner)
        return CaptionRound(task, settings, objective, params, received=received, path=path)

    def inputs(self, split: CaptionedFeatures) -> Inputs:
        return (split.features, split.patches)

    def held_out_metrics(self, objective: Objective, params: Params) -> dict[str, float]:
        held_out = self.workspace.evaluation
        if not len(held_out):
            return {}
        with torch.no_grad():
            losses, _ = objective.losses(None, params, self.inputs(held_out), held_out.labels)
        return {"caption_loss": float(losses.mean())}

    def upload(self, round_: CaptionRound, trained: Params) -> dict[str, np.ndarray]:
        """The K largest rows of the (privatised, under dp = "client") update and their numbers."""
        core = round_.settings.core
        update = {"rows": (trained["global"] - round_.received).numpy()}
        if core.dp == "client":
            update, _ = client_level_mechanism(update, core.clip, core.noise_multiplier, secure_rng())
        indices, rows = top_k_rows(update["rows"], round_.settings.client.rows_sent)
        return {"rows": rows.astype(np.float32), "indices": indices.astype(np.float32)}

    def keep(self, round_: CaptionRound, trained: Params) -> None:
        """The local parts (next round's start) and the device's captioner prompt file."""
        parts = {k: v.numpy() for k, v in trained.items()}
        if round_.settings.client.gate == "softmax":
            save_tensors(round_.path, {k: v for k, v in parts.items() if k != "global"})
            save_prompt_parts(self.workspace.state_dir, parts)
        else:
            save_prompt_parts(self.workspace.state_dir, {"prompt": parts["global"]})
