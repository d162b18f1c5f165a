"""What a device keeps of its last run, so that it can classify with the federation's result
(`fedprompt predict`) long after the run is over, without the aggregator.

Three files in the state folder: `run.json` (the run, method and round settings of the last task
this device trained for), `served-model.tensors` (what the aggregator served this
device when the run finished: the global state plus its per-client extras, e.g. pFedMoAP's
experts) and `classes.json` (the class names in label order and the digest of the bundle, written when the
workspace is loaded, so a classifier is never rebuilt on another bundle or label order).
With what the method keeps on the device (`edge_client.methods.local_state`) they rebuild the
device's classifier through the method's own `head`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.methods.base import RoundTask
from fedprompt.common.codec import CodecError, decode_tensor_set, encode_tensor_set
from fedprompt.common.files import write_atomically

RUN_FILE = "run.json"
SERVED_FILE = "served-model.tensors"
CLASSES_FILE = "classes.json"


class DeviceRunError(Exception):
    """The state folder holds no finished run to classify with (one line for the CLI)."""


def save_classes(state_dir: Path, class_names: tuple[str, ...], bundle_digest: str) -> None:
    record = {"class_names": list(class_names), "bundle_digest": bundle_digest}
    write_atomically(Path(state_dir) / CLASSES_FILE, json.dumps(record, indent=2).encode())


def save_task(state_dir: Path, task: RoundTask) -> None:
    """Record the task this device is about to train for (its tensors are not kept)."""
    record = {
        "run_id": task.run_id,
        "round_id": task.round_id,
        "method": task.method,
        "settings": task.settings,
    }
    write_atomically(Path(state_dir) / RUN_FILE, json.dumps(record, indent=2).encode())


def save_served(state_dir: Path, run_id: str, round_id: int, tensors: dict[str, np.ndarray]) -> bool:
    """Keep the model served at the end of run `run_id` (after round `round_id`); False when this
    device never trained for that run, so there is no classifier to build from it."""
    path = Path(state_dir) / RUN_FILE
    if not path.exists() or json.loads(path.read_text())["run_id"] != run_id:
        return False
    record = json.loads(path.read_text())
    record["served_round_id"] = round_id
    write_atomically(Path(state_dir) / SERVED_FILE, encode_tensor_set(tensors, "fp32"))
    write_atomically(path, json.dumps(record, indent=2).encode())
    return True


@dataclass(frozen=True)
class DeviceRun:
    """A finished run as this device holds it."""

    run_id: str
    method: str
    round_id: int  # the last committed round, whose model was served
    settings: dict[str, Any]
    bundle_digest: str  # of the bundle the device's data was featurised (and trained) with
    served: dict[str, np.ndarray]
    class_names: tuple[str, ...]

    def next_task(self) -> RoundTask:
        """The task of a would-be next round: what a method's `head` builds the classifier from."""
        return RoundTask(self.run_id, self.round_id + 1, self.method, self.settings, self.served, 0.0)


def load_device_run(state_dir: str | Path) -> DeviceRun:
    state_dir = Path(state_dir)
    run_path, served_path = state_dir / RUN_FILE, state_dir / SERVED_FILE
    if not run_path.exists() or not served_path.exists():
        raise DeviceRunError(
            f"{state_dir} holds no finished run: run `fedprompt client run` with this state folder "
            "until the aggregator finishes the run"
        )
    record = json.loads(run_path.read_text())
    if "served_round_id" not in record:
        raise DeviceRunError(f"run {record['run_id']} in {state_dir} has not finished on this device yet")
    try:
        served = decode_tensor_set(served_path.read_bytes())
    except CodecError as error:
        raise DeviceRunError(f"{served_path} is not readable ({error})") from None
    classes = json.loads((state_dir / CLASSES_FILE).read_text())
    return DeviceRun(
        record["run_id"],
        record["method"],
        int(record["served_round_id"]),
        record["settings"],
        classes["bundle_digest"],
        served,
        tuple(classes["class_names"]),
    )
