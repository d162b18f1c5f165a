"""FedMVP, client half: a PromptFormer trained through the frozen image tower, averaged by the
server.

A round starts from the received PromptFormer (the run's seeded initialisation in round 1, sent
by the aggregator like every global state), trains it on the device's images (`FedMVPObjective`:
cross-entropy over the attribute-sentence logits plus the flip-consistency term; DP-SGD through
the generic per-example path under `dp = "sample"`), and uploads the round's delta (new -
received): under `dp = "client"` clipped to `clip` and noised on the device, then, with
`compression = "lowrank"`, as low-rank factors whose residual the device keeps for its next round
(error feedback; computed from the privatised delta, so free of privacy cost).

The attribute sentences come from the device (`edge_client.attributes`): its own file, the
shipped one for its classes, or class names (said once). Their features, the flipped images'
frozen features and the images' embeddings are computed once per device, not per step.

The device classifies with its own image side (`image_encoder`: the PromptFormer's prompts in the
frozen tower) and the attribute head; `fedprompt predict` and `export-classifier` use both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from edge_client.attributes import Sentences, device_sentences
from edge_client.methods import register
from edge_client.methods.base import ClientMethod, LocalRound, RoundTask
from edge_client.methods.fedmvp_inputs import fedmvp_inputs
from edge_client.methods.fedmvp_objective import FedMVPHead, FedMVPImageEncoder, FedMVPObjective
from edge_client.methods.local_state import load_tensors, save_tensors, state_file
from edge_client.methods.round_parts import received_tensor
from edge_client.training import Inputs, Params, normalise
from edge_client.workspace import FEATURES_DIR, ClientWorkspace, LabelledFeatures
from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.compact_update import compress, decompress
from fedprompt.common.methods import TaskSettings
from fedprompt.common.methods.fedmvp import initial_former
from fedprompt.common.privacy import client_level_mechanism, secure_rng


@dataclass
class FedMVPRound(LocalRound):
    memory: dict[str, np.ndarray] = field(default_factory=dict)  # error feedback kept after upload


@register
class FedMVPClient(ClientMethod):
    name = "fedmvp"

    def __init__(self, workspace: ClientWorkspace) -> None:
        super().__init__(workspace)
        self._tower = workspace.bundle.image_tower()
        self._sentences: tuple[Sentences, torch.Tensor] | None = None
        self._inputs: dict[int, Inputs] = {}

    def attribute_features(self) -> tuple[Sentences, torch.Tensor]:
        """The device's sentences and their normalised features [M, D], computed once."""
        if self._sentences is None:
            ws = self.workspace
            found = device_sentences(ws.state_dir, ws.class_names)
            with torch.no_grad():
                features = normalise(ws.tower.encode_token_ids(ws.bundle.tokenizer()(list(found.texts))))
            self._sentences = found, features
        return self._sentences

    def objective(self, settings: TaskSettings) -> FedMVPObjective:
        found, features = self.attribute_features()
        client = settings.client
        return FedMVPObjective(
            self._tower,
            features,
            found.classes,
            len(self.workspace.class_names),
            self.workspace.logit_scale,
            client.prompt_tokens,
            client.former_heads,
            client.alpha,
        )

    def start(self, task: RoundTask, settings: TaskSettings) -> Params:
        """The received PromptFormer (shapes checked), or the run's seeded initialisation."""
        dims = BundleDims.from_manifest(self.workspace.bundle.manifest, self.workspace.bundle.digest)
        initial = initial_former(settings, dims)
        received = {name: received_tensor(task, name, t.shape) for name, t in initial.items()}
        return {
            name: torch.from_numpy(initial[name]) if tensor is None else tensor
            for name, tensor in received.items()
        }

    def prepare(self, task: RoundTask, settings: TaskSettings) -> FedMVPRound:
        return FedMVPRound(task, settings, self.objective(settings), self.start(task, settings))

    def inputs(self, split: LabelledFeatures) -> Inputs:
        """(embeddings, flipped-image features) of the split's images, once per split."""
        key = id(split)
        if key not in self._inputs:
            ws = self.workspace
            self._inputs[key] = fedmvp_inputs(
                split.images, ws.bundle, self._tower, ws.state_dir / FEATURES_DIR
            )
        return self._inputs[key]

    def upload(self, round_: FedMVPRound, trained: Params) -> dict[str, np.ndarray]:
        core, client = round_.settings.core, round_.settings.client
        delta = {name: (trained[name] - round_.params[name]).numpy() for name in trained}
        if core.dp == "client":
            delta, _ = client_level_mechanism(delta, core.clip, core.noise_multiplier, secure_rng())
        if client.compression == "none":
            return {name: tensor.astype(np.float32) for name, tensor in delta.items()}
        path = state_file(self.workspace.state_dir, self.name, round_.task.run_id)
        upload, round_.memory = compress(delta, client.compression_rank, load_tensors(path), secure_rng())
        return upload

    def keep(self, round_: FedMVPRound, trained: Params) -> None:
        if round_.memory:
            save_tensors(state_file(self.workspace.state_dir, self.name, round_.task.run_id), round_.memory)

    def served(self, round_: FedMVPRound, trained: Params, upload: dict[str, np.ndarray]) -> Params:
        """The received PromptFormer plus the delta as uploaded (privatised, compressed)."""
        shapes = {name: tuple(t.shape) for name, t in round_.params.items()}
        dense = decompress(upload, shapes)
        return {name: round_.params[name] + torch.from_numpy(dense[name]) for name in shapes}

    def head(self, task: RoundTask) -> FedMVPHead:
        return FedMVPHead(self.objective(TaskSettings.from_dict(self.name, task.settings)))

    def image_encoder(self, task: RoundTask) -> FedMVPImageEncoder:
        settings = TaskSettings.from_dict(self.name, task.settings)
        return FedMVPImageEncoder(self.objective(settings), self.start(task, settings))
