"""FedMVP's client half on a real bundle and real PNG folders: rounds start from the spec's
seeded PromptFormer and improve the local loss; every upload has the spec's names and shapes for
each compression; the low-rank residual is kept on the device; sample-level DP-SGD through the
tower and client-level DP are accounted; the served classifier is the trained objective's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from colour_images import write_colour_folder

from edge_client.class_heads import encoded_features, head_accuracy
from edge_client.methods.base import RoundTask
from edge_client.methods.local_state import load_tensors, state_file
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.workspace import ClientWorkspace
from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.methods import METHOD_SPECS, RunSettings

FAST = {"lr": 0.002, "optimizer": "adam", "batch_size": 8, "former_heads": 4, "ff_mult": 2}


@pytest.fixture(scope="module")
def workspace(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> ClientWorkspace:
    data = write_colour_folder(tmp_path_factory.mktemp("colours") / "train", per_class=6)
    return ClientWorkspace.load(tiny_bundle, data, state_dir=tmp_path_factory.mktemp("state"), progress=False)


def _task(workspace: ClientWorkspace, round_id: int, values: dict, state: dict | None = None) -> RoundTask:
    run = RunSettings.from_flat("fedmvp", values)
    dims = BundleDims.from_manifest(workspace.bundle.manifest, workspace.bundle.digest)
    tensors = state if state is not None else METHOD_SPECS["fedmvp"].initial_state(run.task, dims)
    return RoundTask("run", round_id, "fedmvp", run.task.to_dict(), tensors, deadline_unix=0.0)


def _shapes(workspace: ClientWorkspace, values: dict) -> dict:
    run = RunSettings.from_flat("fedmvp", values)
    dims = BundleDims.from_manifest(workspace.bundle.manifest, workspace.bundle.digest)
    return METHOD_SPECS["fedmvp"].expected_update(run.task, dims)


def test_rounds_train_the_promptformer_and_serve_its_classifier(workspace: ClientWorkspace) -> None:
    client = CLIENT_METHODS["fedmvp"](workspace)
    settings = {**FAST, "local_epochs": 3}
    task = _task(workspace, 1, settings)
    result = client.run_round(task)
    assert {n: t.shape for n, t in result.tensors.items()} == _shapes(workspace, settings)
    assert result.metrics["train_loss"] > 0 and result.num_examples == len(workspace.train)
    state = {name: task.tensors[name] + result.tensors[name] for name in task.tensors}
    second = client.run_round(_task(workspace, 2, settings, state))
    assert second.metrics["train_loss"] < result.metrics["train_loss"]
    # the served classifier (image side + head) scores what the round reported for the same tensors
    served = _task(workspace, 3, settings, state)
    features = encoded_features(client.image_encoder(served), workspace.evaluation.images, workspace.bundle)
    accuracy = head_accuracy(client.head(served), features, workspace.evaluation.labels)
    assert accuracy == pytest.approx(second.metrics["received_accuracy"], abs=1e-6)


def test_lowrank_uploads_keep_their_residual_on_the_device(workspace: ClientWorkspace) -> None:
    client = CLIENT_METHODS["fedmvp"](workspace)
    settings = {**FAST, "compression": "lowrank", "compression_rank": 2}
    result = client.run_round(_task(workspace, 1, settings))
    shapes = _shapes(workspace, settings)
    assert {n: t.shape for n, t in result.tensors.items()} == shapes and "ff_in_weight.p" in shapes
    kept = load_tensors(state_file(workspace.state_dir, "fedmvp", "run"))
    assert np.abs(kept["ff_in_weight.error"]).sum() > 0 and "ff_in_weight.basis" in kept


@pytest.mark.parametrize("dp", ["sample", "client"])
def test_local_dp_is_applied_and_accounted(workspace: ClientWorkspace, dp: str) -> None:
    client = CLIENT_METHODS["fedmvp"](workspace)
    settings = {**FAST, "dp": dp, "clip": 0.5, "noise_multiplier": 1.0}
    result = client.run_round(_task(workspace, 1, settings))
    assert result.privacy["epsilon"] > 0 and {n: t.shape for n, t in result.tensors.items()} == _shapes(
        workspace, settings
    )
    if dp == "client":  # the clipped delta plus noise of std 0.5 per coordinate: far above the clip
        norm = np.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in result.tensors.values()))
        assert norm > 10 * 0.5
