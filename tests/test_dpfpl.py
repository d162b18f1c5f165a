"""DP-FPL against its definition: the low-rank factorisation, the detached residual, local DP as a
real DP-SGD (each example's gradient clipped over the global prompt and u, v jointly), the local
prompt kept on the device, and the server's global DP (clip per client, noise std, epsilon from
opacus, accountant persisted across a restart)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from colour_images import write_colour_folder
from independent_accounting import assert_tight

from aggregator.config import ConfigError
from aggregator.strategies.base import ClientUpdate, ServerStrategy
from aggregator.strategies.combine import UpdateCombiner
from aggregator.strategies.registry import SERVER_STRATEGIES
from edge_client.bundle import Bundle
from edge_client.dp_sgd import per_example_gradients, train_dp_sgd
from edge_client.methods.base import RoundTask
from edge_client.methods.dpfpl import PersonalObjective, PersonalPrompt
from edge_client.methods.local_state import load_tensors, state_file
from edge_client.methods.low_rank import factorise
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.prompt_encoder import PromptTextEncoder
from edge_client.prompts import initial_context, tokenize_class_prompts
from edge_client.training import normalise, prompt_loss
from edge_client.workspace import ClientWorkspace
from fedprompt.common.methods import RunSettings
from fedprompt.common.settings import SettingsError, TrainingSettings


def server_half(method: str, values: dict, **kwargs: object) -> ServerStrategy:
    """The method's server half for these (flat) settings."""
    return SERVER_STRATEGIES[method](RunSettings.from_flat(method, values), **kwargs)


SCALE = 20.0


def test_warm_started_power_iterations_reach_the_best_rank_r_approximation() -> None:
    generator = torch.Generator().manual_seed(0)
    left, right = (
        torch.linalg.qr(torch.randn(16, 16, generator=generator))[0],
        torch.randn(16, 64, generator=generator),
    )
    matrix = left @ torch.diag(torch.logspace(0, -2, 16)) @ torch.linalg.qr(right.T)[0].T  # known spectrum
    rank = 4
    best = float(torch.linalg.svdvals(matrix)[rank:].square().sum().sqrt())  # Eckart-Young
    factors, errors = None, []
    for _ in range(30):
        factors = factorise(matrix, rank, None if factors is None else factors.v, generator)
        errors.append(float((matrix - factors.u @ factors.v).norm()))
        torch.testing.assert_close(factors.matrix(), matrix, rtol=0, atol=1e-6)  # u v + residual = M
        torch.testing.assert_close(factors.u.T @ factors.u, torch.eye(rank), rtol=0, atol=1e-5)
    assert errors[0] > 1.05 * best  # one iteration from a random start is not yet optimal ...
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in itertools.pairwise(errors))
    assert errors[-1] == pytest.approx(best, rel=1e-4)  # ... warm-started iterations converge to it
    assert factors.u.shape == (16, rank) and factors.v.shape == (rank, 64)
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.16"):
        factorise(matrix, 17, None, generator)


@pytest.fixture(scope="module")
def text(tiny_bundle: Path) -> dict:
    bundle = Bundle.open(tiny_bundle)
    tower = bundle.text_tower()
    eot = int(bundle.manifest["tokenizer"]["eot_token_id"])
    tokens = tokenize_class_prompts(bundle.tokenizer(), ["cat", "dog", "small bird", "fish"], 4, eot)
    generator = torch.Generator().manual_seed(1)
    return {
        "encode": PromptTextEncoder(tower, tokens, "shared"),
        "width": tower.spec.width,
        "images": normalise(torch.randn(10, bundle.embed_dim, generator=generator)),
        "labels": torch.arange(10) % 4,
    }


def _personal(text: dict, rank: int = 2) -> tuple[PersonalPrompt, torch.Tensor]:
    width = text["width"]
    return PersonalPrompt.start(
        initial_context(4, width, 0.3, seed=3), initial_context(4, width, 0.3, seed=4), rank, None, seed=0
    )


def test_prompt_is_global_plus_exact_local_and_the_residual_gets_no_gradient(text: dict) -> None:
    prompt, theta = _personal(text)
    _, u, v = prompt.unpack(theta)
    torch.testing.assert_close(
        prompt.local(theta), initial_context(4, text["width"], 0.3, seed=4), rtol=0, atol=1e-6
    )
    theta = theta.clone().requires_grad_(True)
    loss, _ = prompt_loss(
        theta, lambda t: text["encode"](prompt.prompt(t)), text["images"], text["labels"], SCALE
    )
    loss.backward()
    _, grad_u, grad_v = prompt.unpack(theta.grad)
    full = prompt.prompt(theta.detach()).requires_grad_(True)  # the same prompt as a leaf: dL/dprompt
    prompt_loss(full, text["encode"], text["images"], text["labels"], SCALE)[0].backward()
    # only u @ v carries gradient to u and v: were the residual (M - u v) not detached, they would get none
    torch.testing.assert_close(grad_u, full.grad @ v.T, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_v, u.T @ full.grad, rtol=1e-4, atol=1e-7)
    assert float(grad_u.norm()) > 0 and not prompt.residual.requires_grad


def _one_dp_step(text: dict, images: torch.Tensor, clip: float) -> torch.Tensor:
    """One noiseless DP-SGD step over all examples (q = 1) with plain SGD at lr 1; returns theta."""
    prompt, theta = _personal(text)
    settings = TrainingSettings(lr=1.0, momentum=0.0, clip=clip, noise_multiplier=0.0)
    objective = PersonalObjective(prompt, text["encode"], SCALE)
    new, stats = train_dp_sgd(objective, {"theta": theta}, (images,), text["labels"], settings, 1.0, 1)
    assert stats.steps == 1 and stats.seen == len(images)
    return new["theta"]


def test_local_dp_clips_each_examples_gradient_over_global_and_low_rank_parts_jointly(text: dict) -> None:
    clip, n = 1e-3, len(text["labels"])
    prompt, theta = _personal(text)
    prompt.refactorise(theta)  # what the step does first

    objective = PersonalObjective(prompt, text["encode"], SCALE)
    grads, _, _ = per_example_gradients(objective, {"theta": theta}, (text["images"],), text["labels"])
    grads = grads["theta"]
    assert float(grads.norm(dim=1).min()) > 10 * clip  # clipping is active for every example
    sizes = [part.numel() for part in prompt.unpack(theta)]
    for part in grads.split(sizes, dim=1):  # every example has gradient in the global, u and v parts
        assert float(part.norm(dim=1).min()) > 0
    base = _one_dp_step(text, text["images"], clip)
    assert float((base - theta).norm()) <= clip * (1 + 1e-4)  # the mean of gradients clipped to <= C
    for replaced in range(3):
        other = text["images"].clone()
        other[replaced] = -other[replaced]
        moved = float((_one_dp_step(text, other, clip) - base).norm()) * n  # undo the mean
        assert 0 < moved <= 2 * clip * (1 + 1e-4)  # one example moves all parts together by <= 2C


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_folder(tmp_path_factory.mktemp("colours") / "train", per_class=10)


def _task(round_id: int, settings: dict, tensors: dict | None = None) -> RoundTask:
    task_settings = RunSettings.from_flat("dpfpl", settings).task.to_dict()
    return RoundTask("run-a", round_id, "dpfpl", task_settings, tensors or {}, deadline_unix=0.0)


def test_client_uploads_only_the_global_prompt_keeps_the_local_one_and_accounts_every_step(
    tiny_bundle: Path, colour_data: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    workspace = ClientWorkspace.load(tiny_bundle, colour_data, state_dir=state, progress=False)
    client = CLIENT_METHODS["dpfpl"](workspace)
    settings = {"n_ctx": 4, "rank": 2, "batch_size": 8, "lr": 0.05, "dp": "sample", "noise_multiplier": 1.1}
    first = client.run_round(_task(1, settings))
    saved = load_tensors(state_file(state, "dpfpl", "run-a"))
    assert set(first.tensors) == {"ctx"} and first.tensors["ctx"].shape == (4, workspace.text_width)
    assert saved["local"].shape == (4, workspace.text_width) and saved["v"].shape == (2, workspace.text_width)
    assert float(np.abs(first.tensors["ctx"]).max()) > 0  # the global prompt trained from zero
    second = client.run_round(_task(2, settings, first.tensors))
    moved = load_tensors(state_file(state, "dpfpl", "run-a"))["local"]
    assert not np.allclose(moved, saved["local"])  # the local prompt went on from where it was saved
    n = len(workspace.train)
    q, steps = 8 / n, -(-n // 8)
    assert_tight(second.privacy["epsilon"], [(1.1, q, 2 * steps)], 1e-5)
    assert (second.privacy["sample_rate"], second.privacy["total_steps"]) == (q, 2 * steps)
    assert {"accuracy", "received_accuracy", "train_loss"} <= set(second.metrics)
    with pytest.raises(SettingsError, match='set dp = "sample"'):
        client.run_round(_task(3, {**settings, "dp": "client"}))
    with pytest.raises(SettingsError, match="'rank' must be at most n_ctx"):
        client.run_round(_task(3, {**settings, "rank": 5}))


def _updates(*deltas: np.ndarray) -> list[ClientUpdate]:
    return [
        ClientUpdate(f"c{i}", {"ctx": d.astype(np.float32)}, num_examples=10 * (i + 1))
        for i, d in enumerate(deltas)
    ]


@pytest.mark.filterwarnings(
    "ignore:Optimal order is the smallest alpha"
)  # the near-silent mechanism's epsilon
def test_global_dp_clips_each_client_and_adds_noise_of_sigma_times_clip_on_the_sum() -> None:
    shape = (16, 64)
    reference = {"ctx": np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)}
    far, near = np.zeros(shape), np.zeros(shape)
    far[0, 0], near[1, 1] = 100.0, 0.5  # one client far beyond the clip, one inside it
    almost_silent = SERVER_STRATEGIES["dpfpl"](
        RunSettings.from_flat("dpfpl", {"global_clip": 1.0, "global_noise_multiplier": 1e-9})
    )
    new, metrics = almost_silent.aggregate(
        reference, _updates(reference["ctx"] + far, reference["ctx"] + near)
    )
    expected = np.zeros(shape)
    expected[0, 0], expected[1, 1] = 1.0 / 2, 0.5 / 2  # clipped to C = 1, unweighted mean over 2 clients
    np.testing.assert_allclose(new["ctx"] - reference["ctx"], expected, atol=1e-5)
    assert metrics["global_clipped_updates"] == 1

    sigma, clip, clients = 2.0, 0.5, 4
    still = {"ctx": np.zeros((64, 256), np.float32)}  # nothing to move: the change is pure noise
    noisy = SERVER_STRATEGIES["dpfpl"](
        RunSettings.from_flat("dpfpl", {"global_clip": clip, "global_noise_multiplier": sigma})
    )
    new, _ = noisy.aggregate(still, _updates(*[still["ctx"]] * clients))
    noise = new["ctx"].astype(np.float64) * clients  # the noise added to the sum
    assert abs(noise.mean()) < 5 * sigma * clip / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(sigma * clip, rel=0.03)  # 16384 values: ~5 standard errors


def test_global_dp_epsilon_is_opacus_at_half_sigma_per_round_and_survives_a_restart() -> None:
    settings = {"global_clip": 1.0, "global_noise_multiplier": 3.0, "delta": 1e-6}
    strategy = server_half("dpfpl", settings)
    state: dict[str, np.ndarray] = {}  # before round 1: zero
    rng = np.random.default_rng(1)
    for _ in range(2):
        state, metrics = strategy.aggregate(state, _updates(*rng.normal(0, 0.1, (3, 4, 8))))
    assert_tight(metrics["global_epsilon"], [(1.5, 1.0, 2)], 1e-6)
    assert (metrics["global_rounds"], metrics["global_sample_rate"], metrics["global_delta"]) == (
        2,
        1.0,
        1e-6,
    )
    restarted = SERVER_STRATEGIES["dpfpl"](
        RunSettings.from_flat("dpfpl", settings)
    )  # a new daemon loading the committed state
    restarted.load_state_dict(strategy.state_dict())
    _, metrics = restarted.aggregate(state, _updates(*rng.normal(0, 0.1, (3, 4, 8))))
    assert_tight(metrics["global_epsilon"], [(1.5, 1.0, 3)], 1e-6)


def test_global_dp_refuses_a_robust_rule_it_would_silently_replace() -> None:
    with pytest.raises(ConfigError, match=r"leave \[aggregation\] at its defaults"):
        SERVER_STRATEGIES["dpfpl"](
            RunSettings.from_flat("dpfpl", {"global_noise_multiplier": 1.0}),
            combiner=UpdateCombiner("median"),
        )
    assert (
        SERVER_STRATEGIES["dpfpl"](
            RunSettings.from_flat("dpfpl", {}), combiner=UpdateCombiner("median")
        ).global_dp
        is None
    )  # no DP: robust ok
