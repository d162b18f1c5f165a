"""Pieces of a round written once: the device's accountant paying for the round before any data
is touched, the round's shuffling generator (both for the skeleton in `base`), the received global
context checked against the bundle (or the shared initialisation when none is sent), and
client-level privatisation of an upload."""

from __future__ import annotations

import numpy as np
import torch

from edge_client.local_privacy import LocalAccountant, RoundCost, round_cost
from edge_client.methods.base import RoundTask
from edge_client.prompts import initial_context
from edge_client.workspace import ClientWorkspace, WorkspaceError
from fedprompt.common.privacy import client_level_mechanism, secure_rng
from fedprompt.common.settings import TrainingSettings


def received_tensor(task: RoundTask, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The task's tensor `name` as float32 torch, or None if the server sent none (round 1).
    A shape that does not fit this bundle is one clear line, not a crash deep in training."""
    if name not in task.tensors:
        return None
    tensor = task.tensors[name]
    if tuple(tensor.shape) != shape:
        raise WorkspaceError(f"received {name} of shape {tuple(tensor.shape)} but this bundle needs {shape}")
    return torch.from_numpy(np.asarray(tensor, np.float32))


def global_context(task: RoundTask, settings: TrainingSettings, width: int) -> torch.Tensor:
    """The task's global `ctx`, or in round 1 (none yet) the shared seeded CoOp initialisation
    (settings `seed`, `ctx_init_std`), so every client of a run starts alike."""
    ctx = received_tensor(task, "ctx", (settings.n_ctx, width))
    if ctx is None:
        return initial_context(settings.n_ctx, width, settings.ctx_init_std, settings.seed)
    return ctx


def paid_round(
    workspace: ClientWorkspace, settings: TrainingSettings
) -> tuple[LocalAccountant, RoundCost | None]:
    """The device's accountant with this round's cost already recorded and saved (None without
    local DP); raises BudgetExceeded before any training if the budget cannot afford it."""
    cost = round_cost(settings, len(workspace.train))
    accountant = LocalAccountant(workspace.state_dir, settings)
    if cost is not None:
        accountant.spend(cost)
    return accountant, cost


def round_generator(settings: TrainingSettings, round_id: int) -> torch.Generator:
    """Shuffling order of plain (non-private) training: reproducible per run seed and round."""
    return torch.Generator().manual_seed(settings.seed * 1_000_003 + round_id)


def client_level_upload(start: torch.Tensor, new: torch.Tensor, settings: TrainingSettings) -> np.ndarray:
    """What leaves the device: the new context, or under client-level DP `start + noised(clip(new -
    start))`, so the server only ever sees the privatised value."""
    upload = new.numpy()
    if settings.dp == "client":
        update = {"ctx": upload - start.numpy()}
        noised, _ = client_level_mechanism(update, settings.clip, settings.noise_multiplier, secure_rng())
        upload = start.numpy() + noised["ctx"]
    return upload.astype(np.float32)
