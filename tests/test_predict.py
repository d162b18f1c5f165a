"""On-device inference with what a device holds after a run: `fedprompt predict` gives the
accuracy the harness reports for each method, the exported classifier gives the same predictions
in a process where torch cannot be imported, and an altered or missing piece is one clear line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aggregator_process import FEDPROMPT as FEDPROMPT_SCRIPT
from colour_images import write_colour_folder

from edge_client.class_heads import encoded_features, head_accuracy
from edge_client.classifier_export import export_classifier
from edge_client.datasets import load_dataset
from edge_client.exported_classifier import HEAD_FILE, ClassifierError, ExportedClassifier
from edge_client.methods.base import RoundTask
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.predict import DeviceClassifier
from edge_client.workspace import ClientWorkspace
from fedprompt.common.methods import RunSettings
from fedprompt.harness.in_process import FederationRules, run_federated

FEDPROMPT = [FEDPROMPT_SCRIPT]

METHOD_SETTINGS = {
    "promptfl": {},
    "dpfpl": {"rank": 2},
    "pfedmoap": {"experts": 2},
    "secfpp": {"clusters": 2, "cluster_dim": 4},
    "fedmvp": {"former_heads": 4, "ff_mult": 2, "compression": "lowrank", "compression_rank": 2},
}


def _clients(bundle: Path, root: Path, count: int = 4) -> list[ClientWorkspace]:
    return [
        ClientWorkspace.load(
            bundle,
            write_colour_folder(root / f"train{i}", per_class=6, seed=i),
            write_colour_folder(root / f"eval{i}", per_class=3, seed=100 + i),
            state_dir=root / f"state{i}",
            progress=False,
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module", params=sorted(METHOD_SETTINGS))
def finished(request: pytest.FixtureRequest, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """(method, root, workspaces, run) after a 2-round in-process run of each method."""
    method = request.param
    root = tmp_path_factory.mktemp(method)
    workspaces = _clients(tiny_bundle, root)
    settings = RunSettings.from_flat(
        method, {"n_ctx": 2, "batch_size": 8, "lr": 0.02, **METHOD_SETTINGS[method]}
    )
    run = run_federated(settings, workspaces, FederationRules(rounds=2), root / "agg.sqlite")
    return method, root, workspaces, run


def test_predict_gives_the_accuracy_the_harness_reports(finished, tiny_bundle: Path) -> None:
    method, root, workspaces, run = finished
    for i, workspace in enumerate(workspaces):
        classifier = DeviceClassifier.load(tiny_bundle, workspace.state_dir)
        assert (classifier.run.method, classifier.run.round_id) == (method, 2)
        images = load_dataset(root / f"eval{i}")
        logits = classifier.logits(classifier.features(images))
        accuracy = float((logits.argmax(axis=1) == images.labels).mean())
        assert accuracy == pytest.approx(run.served_accuracy[i], abs=1e-9)


def test_head_is_what_a_round_starts_from(finished) -> None:
    """The one classifier definition: a method's head scores the served task exactly as its round
    reports `received_accuracy` for that task (measured before any training)."""
    method, _, workspaces, _ = finished
    workspace = workspaces[0]
    classifier_run = DeviceClassifier.load(workspace.bundle.path, workspace.state_dir).run
    task = classifier_run.next_task()
    client = CLIENT_METHODS[method](workspace)
    features, labels = workspace.evaluation.tensors()
    encoder = client.image_encoder(task)
    if encoder is not None:  # a method with its own image side (FedMVP) classifies the images
        features = encoded_features(encoder, workspace.evaluation.images, workspace.bundle)
    expected = head_accuracy(client.head(task), features, labels)
    trial = workspace.state_dir.parent / "trial"
    shutil.copytree(workspace.state_dir, trial)
    copy = ClientWorkspace(
        workspace.bundle, workspace.tower, workspace.class_names, workspace.train, workspace.evaluation, trial
    )
    result = CLIENT_METHODS[method](copy).run_round(
        RoundTask(task.run_id, task.round_id, method, task.settings, task.tensors, 0.0)
    )
    assert result.metrics["received_accuracy"] == pytest.approx(expected, abs=1e-6)


def _torch_free_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import torch` fails, as on a device without torch."""
    blocker = tmp_path / "no-torch" / "torch"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text('raise ImportError("torch is not installed on this device")\n')
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(root)])}


def test_exported_classifier_runs_without_torch_and_predicts_the_same(
    finished, tiny_bundle: Path, tmp_path: Path
) -> None:
    method, root, workspaces, _ = finished
    state = workspaces[0].state_dir
    predicted = tmp_path / "predict.json"
    subprocess.run(
        [*FEDPROMPT, "predict", "--bundle", str(tiny_bundle), "--state-dir", str(state),
         "--data", str(root / "eval0"), "--top-k", "2", "--json", str(predicted)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    out = tmp_path / "classifier"
    manifest = export_classifier(DeviceClassifier.load(tiny_bundle, state), out)
    assert manifest["method"] == method and manifest["round_id"] == 2
    exported = tmp_path / "exported.json"
    env = _torch_free_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert check.returncode != 0  # the environment really has no torch
    done = subprocess.run(
        [sys.executable, "-m", "edge_client.exported_classifier", str(out), "--data", str(root / "eval0"),
         "--top-k", "2", "--json", str(exported)],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ours, theirs = json.loads(predicted.read_text()), json.loads(exported.read_text())
    assert ours["accuracy"] == theirs["accuracy"]
    for a, b in zip(ours["predictions"], theirs["predictions"], strict=True):
        assert a["labels"][0] == b["labels"][0]
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)


@pytest.mark.parametrize("finished", ["promptfl"], indirect=True)  # the refusals are the method's no matter
def test_altered_classifier_missing_run_and_other_bundle_are_refused(
    finished, tiny_bundle: Path, tmp_path: Path
) -> None:
    _, root, workspaces, _ = finished
    out = tmp_path / "classifier"
    export_classifier(DeviceClassifier.load(tiny_bundle, workspaces[0].state_dir), out)
    ExportedClassifier(out)  # opens as written
    with (out / HEAD_FILE).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ClassifierError, match="does not match"):
        ExportedClassifier(out)

    fresh = tmp_path / "fresh"
    ClientWorkspace.load(tiny_bundle, root / "train0", state_dir=fresh, progress=False)
    done = subprocess.run(
        [*FEDPROMPT, "predict", "--bundle", str(tiny_bundle), "--state-dir", str(fresh), "--data",
         str(root / "eval0")], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1 and "holds no finished run" in done.stderr

    other = tmp_path / "other-bundle"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["logit_scale"] = float(manifest["logit_scale"])  # same content, rewritten: another digest
    (other / "manifest.json").write_text(json.dumps(manifest, indent=1))
    done = subprocess.run(
        [*FEDPROMPT, "predict", "--bundle", str(other), "--state-dir", str(workspaces[0].state_dir),
         str(next((root / "eval0" / "red").iterdir()))], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1 and "was trained with bundle" in done.stderr


@pytest.mark.parametrize("finished", ["pfedmoap"], indirect=True)  # the heaviest head
def test_bench_classifier_prints_encoder_head_and_total(finished, tiny_bundle: Path, tmp_path: Path) -> None:
    _, _, workspaces, _ = finished
    out = tmp_path / "classifier"
    export_classifier(DeviceClassifier.load(tiny_bundle, workspaces[0].state_dir), out)
    figures = tmp_path / "bench.json"
    done = subprocess.run(
        [*FEDPROMPT, "bench", "classifier", str(out), "--batch", "1", "--batch", "4", "--json", str(figures)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = json.loads(figures.read_text())["rows"]
    assert {(r["batch"], r["part"]) for r in rows} == {
        (b, p) for b in (1, 4) for p in ("encoder", "head", "total")
    }
    assert all(r["ms_per_image"] > 0 for r in rows) and "of the total per image" in done.stdout
