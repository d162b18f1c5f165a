"""Sample-level DP-SGD against its definition: exact per-example gradients, every example's
contribution clipped to C, and Gaussian noise of std sigma*C on each step's sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.bundle import Bundle
from edge_client.dp_sgd import per_example_gradients, train_dp_sgd
from edge_client.prompt_encoder import PromptTextEncoder
from edge_client.prompts import initial_context, tokenize_class_prompts
from edge_client.training import normalise, prompt_loss
from fedprompt.common.settings import TrainingSettings

CLASSES = ["cat", "dog", "small bird", "fish"]
SCALE = 20.0


@pytest.fixture(scope="module")
def setup(tiny_bundle: Path) -> dict:
    bundle = Bundle.open(tiny_bundle)
    tower = bundle.text_tower()
    eot = int(bundle.manifest["tokenizer"]["eot_token_id"])
    tokens = tokenize_class_prompts(bundle.tokenizer(), CLASSES, 4, eot)
    generator = torch.Generator().manual_seed(0)
    return {
        "encode": PromptTextEncoder(tower, tokens, "shared"),
        "ctx": initial_context(4, tower.spec.width, 0.5, seed=0),
        "images": normalise(torch.randn(10, bundle.embed_dim, generator=generator)),
        "labels": torch.arange(10) % len(CLASSES),
    }


def test_per_example_gradients_equal_one_at_a_time_gradients(setup: dict) -> None:
    grads, losses, _ = per_example_gradients(
        setup["ctx"], setup["encode"], setup["images"], setup["labels"], SCALE
    )
    for i in range(len(setup["labels"])):
        ctx = setup["ctx"].clone().requires_grad_(True)
        loss, _ = prompt_loss(
            ctx, setup["encode"], setup["images"][i : i + 1], setup["labels"][i : i + 1], SCALE
        )
        loss.backward()
        assert float(losses[i]) == pytest.approx(loss.item(), rel=1e-5)
        assert float((grads[i] - ctx.grad).norm() / ctx.grad.norm()) < 1e-4


def _one_full_batch_step(setup: dict, images: torch.Tensor, clip: float) -> torch.Tensor:
    """One noiseless DP-SGD step over all examples (q = 1) with plain SGD at lr 1."""
    settings = TrainingSettings(lr=1.0, momentum=0.0, clip=clip, noise_multiplier=0.0)
    new, _ = train_dp_sgd(setup["ctx"], setup["encode"], images, setup["labels"], SCALE, settings, 1.0, 1)
    return new


def test_clipping_bounds_each_examples_influence_on_the_update(setup: dict) -> None:
    clip = 1e-3
    grads, _, _ = per_example_gradients(
        setup["ctx"], setup["encode"], setup["images"], setup["labels"], SCALE
    )
    assert float(grads.flatten(1).norm(dim=1).min()) > 10 * clip  # clipping is active for every example
    n = len(setup["labels"])
    base = _one_full_batch_step(setup, setup["images"], clip)
    assert float((base - setup["ctx"]).norm()) * n <= n * clip * (1 + 1e-4)  # each clipped to <= C
    for replaced in range(3):
        other = setup["images"].clone()
        other[replaced] = -other[replaced]  # replace one example by a very different one
        moved = float((_one_full_batch_step(setup, other, clip) - base).norm()) * n  # undo the mean
        assert 0 < moved <= 2 * clip * (1 + 1e-4)


def test_noise_std_on_a_step_is_sigma_times_clip(setup: dict) -> None:
    """Empty Poisson batches (q ~ 0) make the step pure noise: with lr 1 and expected batch 1 the
    change of ctx is exactly the noise. 20 runs x 4x64 entries: 3% tolerance is ~5 standard errors."""
    sigma, clip = 0.8, 0.25
    settings = TrainingSettings(lr=1.0, momentum=0.0, clip=clip, noise_multiplier=sigma)
    changes = []
    for _ in range(20):
        new, stats = train_dp_sgd(
            setup["ctx"], setup["encode"], setup["images"], setup["labels"], SCALE, settings, 1e-12, 1
        )
        assert stats.steps == 1 and stats.seen == 0
        changes.append((new - setup["ctx"]).numpy())
    noise = np.concatenate(changes).ravel()
    assert abs(noise.mean()) < 0.02 * sigma * clip * 3
    assert noise.std() == pytest.approx(sigma * clip, rel=0.03)


def test_noise_is_not_reproducible_from_the_shared_seed(setup: dict) -> None:
    settings = TrainingSettings(lr=1.0, momentum=0.0, noise_multiplier=1.0, seed=0)
    args = (setup["ctx"], setup["encode"], setup["images"], setup["labels"], SCALE, settings, 0.5, 2)
    first, _ = train_dp_sgd(*args)
    second, _ = train_dp_sgd(*args)
    assert not torch.equal(first, second)
