"""pFedMoAP against its definition: the server sends exactly the K-1 nearest non-local prompts of
its persisted pool, the mixture logits follow lambda*s*(I.T_local) + s*(sub(I).T_moe), the gating
network stays on the device (and survives a restart), and the experts' text features are computed
once per round."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from colour_images import write_colour_folder

from aggregator.strategies.base import ClientUpdate, ServerStrategy
from aggregator.strategies.registry import SERVER_STRATEGIES
from edge_client.methods.base import RoundTask
from edge_client.methods.local_state import load_tensors, state_file
from edge_client.methods.moe_gating import AttentionGating, FeatureSubsampler, mixture_logits
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.prompt_encoder import PromptTextEncoder
from edge_client.training import normalise
from edge_client.workspace import ClientWorkspace
from fedprompt.common.methods import RunSettings, TaskSettings
from fedprompt.common.settings import SettingsError


def server_half(method: str, values: dict, **kwargs: object) -> ServerStrategy:
    """The method's server half for these (flat) settings."""
    return SERVER_STRATEGIES[method](RunSettings.from_flat(method, values), **kwargs)


def test_server_sends_exactly_the_k_minus_1_nearest_non_local_prompts_of_its_pool() -> None:
    rng = np.random.default_rng(0)
    own = rng.normal(0, 1, (4, 8))
    distances = {"d": 0.3, "a": 0.9, "f": 1.2, "b": 1.5, "e": 2.0, "c": 3.0}  # to "me", ids shuffled
    uploads = {"me": own}
    for client, distance in distances.items():
        direction = rng.normal(0, 1, own.shape)
        uploads[client] = own + distance * direction / np.linalg.norm(direction)
    uploads["same_direction"] = 3 * own  # nearest by cosine, far by L2: must not be chosen
    strategy = server_half("pfedmoap", {"experts": 4})
    state: dict[str, np.ndarray] = {}  # before round 1: zero
    assert strategy.tensors_for_client(state, "me") == {}  # round 1: no global prompt, no pool
    updates = [
        ClientUpdate(c, {"ctx": p.astype(np.float32)}, num_examples=1 + i)
        for i, (c, p) in enumerate(uploads.items())
    ]
    state, metrics = strategy.aggregate(state, updates)
    weights = np.arange(1, len(uploads) + 1)
    expected_mean = sum(w * p for w, p in zip(weights, uploads.values(), strict=True)) / weights.sum()
    np.testing.assert_allclose(state["ctx"], expected_mean, rtol=1e-5)  # FedAvg by example count
    assert metrics["pool_size"] == len(uploads)

    restarted = SERVER_STRATEGIES["pfedmoap"](
        RunSettings.from_flat("pfedmoap", {"experts": 4})
    )  # the pool survives via the state
    restarted.load_state_dict(strategy.state_dict())
    sent = restarted.tensors_for_client(state, "me")
    np.testing.assert_array_equal(sent["ctx"], state["ctx"])
    np.testing.assert_allclose(sent["experts"], np.stack([uploads[c] for c in ("d", "a", "f")]), rtol=1e-6)
    assert "experts" not in restarted.tensors_for_client(state, "newcomer")  # first time: no experts
    small = server_half("pfedmoap", {"experts": 10})
    small.aggregate({}, updates[:3])
    assert small.tensors_for_client(state, "me")["experts"].shape == (2, 4, 8)  # fewer than K-1 exist


def test_mixture_logits_are_lambda_local_plus_scaled_gated_experts() -> None:
    generator = torch.Generator().manual_seed(0)
    subsample = FeatureSubsampler(embed_dim=32, gating_dim=8, heads=2)
    assert (subsample.stride, subsample.width) == (4, 8)  # every 4th coordinate, as 512 -> 128
    images = normalise(torch.randn(5, 32, generator=generator))
    local = torch.randn(3, 32, generator=generator)
    gating = AttentionGating(subsample.width, heads=2, scaling=10.0)
    with torch.no_grad():  # value and output projections the identity: any attention mix of equal
        for layer in (gating.value, gating.out):  # experts returns that expert's feature
            layer.weight.copy_(torch.eye(8))
            layer.bias.zero_()
    same = subsample(normalise(local))[None].expand(2, -1, -1)  # two experts equal to the local one
    logits = mixture_logits(images, local, same, gating, subsample, 14.0, 0.5)
    local_logits = 14.0 * images @ normalise(local).T
    expected = 0.5 * local_logits + 14.0 * subsample(images) @ subsample(normalise(local)).T
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        mixture_logits(images, local, None, gating, subsample, 14.0, 0.5), local_logits
    )
    assert FeatureSubsampler(embed_dim=32, gating_dim=128, heads=8).width == 32  # small D: all of it


class CountingEncoder:
    """Our real prompt encoder, observed: records every context it encodes."""

    def __init__(self, encoder: PromptTextEncoder) -> None:
        self.encoder = encoder
        self.calls: list[torch.Tensor] = []

    def __call__(self, ctx: torch.Tensor) -> torch.Tensor:
        self.calls.append(ctx.detach().clone())
        return self.encoder(ctx)

    def count(self, ctx: torch.Tensor) -> int:
        return sum(torch.equal(call, ctx) for call in self.calls)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("colours") / "train", per_class=10)


def _sent(settings: dict) -> dict:
    """What a round task carries for these (flat) settings."""
    return RunSettings.from_flat("pfedmoap", settings).task.to_dict()


def test_gating_stays_on_the_device_and_expert_features_are_computed_once_per_round(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    workspace = ClientWorkspace.load(tiny_bundle, colour_data, state_dir=state, progress=False)
    counting = CountingEncoder(workspace.text_encoder(4))
    monkeypatch.setattr(workspace, "text_encoder", lambda n_ctx, encoding="shared": counting)
    client = CLIENT_METHODS["pfedmoap"](workspace)
    settings = {"n_ctx": 4, "batch_size": 8, "lr": 0.05, "experts": 3, "local_epochs": 2}
    width = workspace.text_width
    first = client.run_round(RoundTask("run-b", 1, "pfedmoap", _sent(settings), {}, 0.0))
    assert not state_file(state, "pfedmoap", "run-b").exists()  # no experts yet: gating not trained
    rng = np.random.default_rng(0)
    experts = rng.normal(0, 0.02, (2, 4, width)).astype(np.float32)
    tensors = {"ctx": first.tensors["ctx"], "experts": experts}
    counting.calls.clear()
    second = client.run_round(RoundTask("run-b", 2, "pfedmoap", _sent(settings), tensors, 0.0))
    assert [counting.count(torch.from_numpy(e)) for e in experts] == [1, 1]  # once per round ...
    assert len(counting.calls) >= 2 * 4 + 2  # ... while the local prompt is encoded every step (8 steps)
    assert set(second.tensors) == {"ctx"} and second.tensors["ctx"].shape == (4, width)  # no gating up
    assert second.metrics["experts"] == 2 and {"accuracy", "received_accuracy"} <= set(second.metrics)
    gating = load_tensors(state_file(state, "pfedmoap", "run-b"))  # it lives on the device
    assert sorted(gating) == [
        f"{layer}.{kind}" for layer in ("key", "out", "query", "value") for kind in ("bias", "weight")
    ]
    assert gating["query.weight"].shape == (32, 32)  # the tiny model's 32-dim features: gating width 32

    restarted = CLIENT_METHODS["pfedmoap"](workspace)  # a new process over the same state folder
    task = RoundTask("run-b", 3, "pfedmoap", _sent(settings), tensors, 0.0)
    loaded = restarted.gating(task, TaskSettings.from_dict("pfedmoap", task.settings), 32)
    for name, tensor in gating.items():
        np.testing.assert_array_equal(loaded.state_dict()[name].numpy(), tensor)
    with pytest.raises(SettingsError, match='set dp = "client"'):
        restarted.run_round(
            RoundTask("run-b", 3, "pfedmoap", _sent({**settings, "dp": "sample"}), tensors, 0.0)
        )
