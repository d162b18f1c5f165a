"""Sample-level DP-SGD against its definition: exact per-example gradients (the fast CoOp path and
the generic vmap(grad) path, also through the image tower with prompt tokens, and chunked), every
example's contribution clipped to C over all trainable tensors jointly, and Gaussian noise of std
sigma*C on each step's sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_client.bundle import Bundle
from edge_client.dp_sgd import per_example_gradients, train_dp_sgd
from edge_client.prompt_encoder import PromptTextEncoder
from edge_client.prompts import initial_context, tokenize_class_prompts
from edge_client.training import (
    Inputs,
    Objective,
    Params,
    PromptObjective,
    class_logits,
    normalise,
    prompt_loss,
)
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
    encode = PromptTextEncoder(tower, tokens, "shared")
    return {
        "bundle": bundle,
        "encode": encode,
        "objective": PromptObjective.coop(encode, SCALE),
        "ctx": initial_context(4, tower.spec.width, 0.5, seed=0),
        "images": normalise(torch.randn(10, bundle.embed_dim, generator=generator)),
        "labels": torch.arange(10) % len(CLASSES),
    }


def test_per_example_gradients_equal_one_at_a_time_gradients(setup: dict) -> None:
    grads, losses, _ = per_example_gradients(
        setup["objective"], {"ctx": setup["ctx"]}, (setup["images"],), setup["labels"]
    )
    grads = grads["ctx"]
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
    new, _ = train_dp_sgd(
        setup["objective"], {"ctx": setup["ctx"]}, (images,), setup["labels"], settings, 1.0, 1
    )
    return new["ctx"]


def test_clipping_bounds_each_examples_influence_on_the_update(setup: dict) -> None:
    clip = 1e-3
    grads, _, _ = per_example_gradients(
        setup["objective"], {"ctx": setup["ctx"]}, (setup["images"],), setup["labels"]
    )
    assert (
        float(grads["ctx"].flatten(1).norm(dim=1).min()) > 10 * clip
    )  # clipping is active for every example
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
            setup["objective"], {"ctx": setup["ctx"]}, (setup["images"],), setup["labels"], settings, 1e-12, 1
        )
        assert stats.steps == 1 and stats.seen == 0
        changes.append((new["ctx"] - setup["ctx"]).numpy())
    noise = np.concatenate(changes).ravel()
    assert abs(noise.mean()) < 0.02 * sigma * clip * 3
    assert noise.std() == pytest.approx(sigma * clip, rel=0.03)


def test_noise_is_not_reproducible_from_the_shared_seed(setup: dict) -> None:
    settings = TrainingSettings(lr=1.0, momentum=0.0, noise_multiplier=1.0, seed=0)
    args = (setup["objective"], {"ctx": setup["ctx"]}, (setup["images"],), setup["labels"], settings, 0.5, 2)
    first, _ = train_dp_sgd(*args)
    second, _ = train_dp_sgd(*args)
    assert not torch.equal(first["ctx"], second["ctx"])


def test_fast_and_generic_paths_give_the_same_per_example_gradients_on_a_coop_loss(setup: dict) -> None:
    args = (setup["objective"], {"ctx": setup["ctx"]}, (setup["images"],), setup["labels"])
    fast, fast_losses, fast_logits = per_example_gradients(*args, fast=True)
    generic, losses, logits = per_example_gradients(*args, fast=False)
    torch.testing.assert_close(generic["ctx"], fast["ctx"], rtol=1e-4, atol=1e-6 * fast["ctx"].abs().max())
    torch.testing.assert_close(losses, fast_losses)
    torch.testing.assert_close(logits, fast_logits)
    assert fast["ctx"].abs().max() > 0


class VisualPromptObjective(Objective):
    """A loss through the torch image tower: `prompts` [P, Wv] inserted after the class token of
    every image, and a `bias` on the class text features (two tensors, clipped jointly)."""

    def __init__(self, tower: torch.nn.Module, text: torch.Tensor) -> None:
        self.tower, self.text = tower, text

    def classify(self, shared: None, params: Params, inputs: Inputs) -> torch.Tensor:
        (images,) = inputs
        prompts = params["prompts"].expand(len(images), -1, -1)
        features, _ = self.tower(images, prompts)
        return class_logits(normalise(features), self.text + params["bias"], SCALE)


@pytest.fixture(scope="module")
def visual(setup: dict) -> dict:
    bundle = setup["bundle"]
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(len(CLASSES), bundle.embed_dim, generator=generator)
    return {
        "objective": VisualPromptObjective(bundle.image_tower(), text),
        "params": {
            "prompts": torch.randn(2, bundle.manifest["image_width"], generator=generator),
            "bias": torch.zeros(len(CLASSES), bundle.embed_dim),
        },
        "images": torch.randn(5, 3, *bundle.manifest["image_size"], generator=generator),
        "labels": torch.arange(5) % len(CLASSES),
    }


def test_generic_gradients_through_the_image_tower_equal_one_at_a_time_autograd(visual: dict) -> None:
    objective, params = visual["objective"], visual["params"]
    assert not objective.example_independent
    grads, losses, _ = per_example_gradients(objective, params, (visual["images"],), visual["labels"])
    for i in range(len(visual["labels"])):
        single = {name: t.clone().requires_grad_(True) for name, t in params.items()}
        loss, _ = objective.losses(None, single, (visual["images"][i : i + 1],), visual["labels"][i : i + 1])
        loss.sum().backward()
        assert float(losses[i]) == pytest.approx(loss.item(), rel=1e-5)
        for name, tensor in single.items():
            reference = tensor.grad
            assert reference.abs().max() > 0
            torch.testing.assert_close(
                grads[name][i], reference, rtol=1e-4, atol=1e-6 * reference.abs().max()
            )


def test_chunking_gives_the_same_gradients(visual: dict) -> None:
    """Equal up to float rounding (batched matrix products round differently per chunk size)."""
    args = (visual["objective"], visual["params"], (visual["images"],), visual["labels"])
    whole, _, _ = per_example_gradients(*args, chunk_size=len(visual["labels"]))
    for chunk in (1, 2):
        chunked, _, _ = per_example_gradients(*args, chunk_size=chunk)
        for name in whole:
            torch.testing.assert_close(
                chunked[name], whole[name], rtol=0, atol=1e-6 * whole[name].abs().max()
            )


def test_dp_sgd_through_the_image_tower_clips_over_all_tensors_jointly(visual: dict) -> None:
    """One noiseless full-batch step: the mean of the clipped gradients has norm <= C over both tensors."""
    clip = 1e-4
    settings = TrainingSettings(lr=1.0, momentum=0.0, clip=clip, noise_multiplier=0.0)
    args = (visual["objective"], visual["params"], (visual["images"],), visual["labels"])
    new, stats = train_dp_sgd(*args, settings, 1.0, 1, chunk_size=2)
    assert stats.steps == 1 and stats.seen == len(visual["labels"])
    moved = torch.cat([(new[name] - visual["params"][name]).flatten() for name in new])
    assert 0 < float(moved.norm()) <= clip * (1 + 1e-4)
    assert all(float((new[name] - visual["params"][name]).norm()) > 0 for name in new)
