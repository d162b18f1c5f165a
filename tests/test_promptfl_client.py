"""The PromptFL client half on a real bundle and real PNG folders: training reduces the loss,
local DP is applied and accounted as documented, the budget holds across restarts, and user
mistakes are one clear line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from colour_images import write_colour_folder
from independent_accounting import assert_tight

from edge_client.bundle import BundleError
from edge_client.methods.base import RoundTask
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.training import prompt_loss
from edge_client.workspace import ClientWorkspace, WorkspaceError
from fedprompt.common.methods import RunSettings, TaskSettings
from fedprompt.common.privacy import BudgetExceeded, PrivacyAccountant

FAST = {"n_ctx": 4, "lr": 0.05, "local_epochs": 1, "batch_size": 8}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("colours") / "train", per_class=10)


def _workspace(bundle: Path, data: Path, state: Path) -> ClientWorkspace:
    return ClientWorkspace.load(bundle, data, state_dir=state, progress=False)


def _task(round_id: int, settings: dict, tensors: dict | None = None) -> RoundTask:
    task_settings = RunSettings.from_flat("promptfl", settings).task.to_dict()
    return RoundTask("run", round_id, "promptfl", task_settings, tensors or {}, deadline_unix=0.0)


def _epsilon(*entries: tuple[float, float, int], delta: float = 1e-5) -> float:
    """What the device's default accountant reports for these entries."""
    return PrivacyAccountant(history=list(entries)).epsilon(delta)


def test_rounds_of_local_training_reduce_the_loss(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    workspace = _workspace(tiny_bundle, colour_data, tmp_path / "state")
    assert workspace.class_names == ("blue", "green", "red", "yellow")
    n_train = len(workspace.train)
    assert n_train + len(workspace.evaluation) == 40 and 24 <= n_train < 40  # about 20% held out
    client = CLIENT_METHODS["promptfl"](workspace)
    settings = {**FAST, "local_epochs": 5, "optimizer": "adam"}
    task = _task(1, settings)
    start = client.prepare(task, TaskSettings.from_dict("promptfl", task.settings)).params["ctx"]
    result = client.run_round(_task(1, settings))
    assert result.tensors["ctx"].shape == (4, workspace.text_width) and result.num_examples == n_train
    for round_id in (2, 3):
        result = client.run_round(_task(round_id, settings, result.tensors))

    def train_loss(ctx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(prompt_loss(ctx, workspace.text_encoder(4), *workspace.train.tensors(), 14.0)[0])

    assert train_loss(torch.from_numpy(result.tensors["ctx"])) < 0.7 * train_loss(start)
    assert (
        result.privacy == {} and result.metrics["train_accuracy"] > 0.6 and result.metrics["accuracy"] > 0.6
    )
    assert {"accuracy", "received_accuracy", "train_loss", "steps"} <= set(result.metrics)


def test_client_level_dp_noises_the_upload_and_accounts_each_round(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    client = CLIENT_METHODS["promptfl"](_workspace(tiny_bundle, colour_data, tmp_path / "state"))
    sigma, clip = 0.5, 0.01
    settings = {**FAST, "n_ctx": 16, "dp": "client", "noise_multiplier": sigma, "clip": clip}
    start = np.random.default_rng(0).normal(0, 0.02, (16, client.workspace.text_width)).astype(np.float32)
    uploads = [client.run_round(_task(r, settings, {"ctx": start})) for r in (1, 2)]
    change = uploads[0].tensors["ctx"] - start  # clipped update (norm <= 0.01) + N(0, (sigma*C)^2) noise
    assert change.std() == pytest.approx(sigma * clip, rel=0.1)  # 1024 entries: ~4.5 standard errors
    report = uploads[1].privacy
    assert_tight(report["epsilon"], [(sigma / 2, 1.0, 2)], 1e-5)  # replace-one: sigma/2, q 1, per round
    assert (report["accounted_noise_multiplier"], report["sample_rate"], report["total_steps"]) == (
        0.25,
        1.0,
        2,
    )


def test_sample_level_dp_accounts_poisson_steps_at_the_real_rate(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    client = CLIENT_METHODS["promptfl"](_workspace(tiny_bundle, colour_data, tmp_path / "state"))
    settings = {**FAST, "dp": "sample", "noise_multiplier": 1.3, "clip": 0.5, "local_epochs": 2}
    result = client.run_round(_task(1, settings))
    n = len(client.workspace.train)
    q, steps = 8 / n, 2 * -(-n // 8)
    assert result.privacy["sample_rate"] == q and result.privacy["steps"] == steps
    assert_tight(result.privacy["epsilon"], [(1.3, q, steps)], 1e-5)
    assert result.metrics["steps"] == steps


def test_budget_is_refused_and_survives_a_restart(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    two, three = _epsilon((0.5, 1.0, 2)), _epsilon((0.5, 1.0, 3))
    settings = {**FAST, "dp": "client", "noise_multiplier": 1.0, "epsilon_budget": (two + three) / 2}
    client = CLIENT_METHODS["promptfl"](_workspace(tiny_bundle, colour_data, state))
    client.run_round(_task(1, settings))
    restarted = CLIENT_METHODS["promptfl"](
        _workspace(tiny_bundle, colour_data, state)
    )  # a new process's view
    assert restarted.run_round(_task(2, settings)).privacy["epsilon"] == pytest.approx(two, rel=1e-9)
    with pytest.raises(BudgetExceeded, match="refusing to train") as error:
        restarted.run_round(_task(3, settings))
    assert "\n" not in str(error.value)


def test_user_mistakes_are_one_clear_line(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(WorkspaceError, match=r"but no .jpg/.jpeg/.png images in them"):
        _workspace(tiny_bundle, tmp_path / "empty", tmp_path / "state")
    other = write_colour_folder(tmp_path / "other", per_class=1)
    shutil.rmtree(other / "red")
    with pytest.raises(WorkspaceError, match="differ from training classes"):
        ClientWorkspace.load(tiny_bundle, colour_data, other, state_dir=tmp_path / "state", progress=False)
    broken = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    data = bytearray((broken / "image_encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (broken / "image_encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256") as error:
        _workspace(broken, colour_data, tmp_path / "state")
    assert "\n" not in str(error.value)
