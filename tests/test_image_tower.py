"""The torch ViT image tower that visual-prompt methods train through: it computes what open_clip's
VisionTransformer computes, inserts prompt tokens as VPT-shallow does (checked against the same
insertion written with open_clip's own modules), gives exact per-example gradients under
vmap(grad), and the prompted ONNX graph computes the same for any number of prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from edge_client.bundle import Bundle
from export.models import WeightsSource, build_model


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.open(tiny_bundle)


@pytest.fixture(scope="module")
def open_clip_model(bundle: Bundle) -> torch.nn.Module:
    return build_model(bundle.manifest["model"], WeightsSource("none", "none"), bundle.manifest["seed"])


def _images(bundle: Bundle, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *bundle.manifest["image_size"], generator=torch.Generator().manual_seed(seed))


def _prompts(bundle: Bundle, n: int, count: int, seed: int = 1) -> torch.Tensor:
    width = bundle.manifest["image_width"]
    return torch.randn(n, count, width, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _open_clip_with_prompts(model: torch.nn.Module, images: torch.Tensor, prompts: torch.Tensor):
    """VPT-shallow written with open_clip's own modules (its MHA blocks): prompts after the class
    token, after the positional embedding, before ln_pre; pooled class token, patch tokens last."""
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(images), 1, -1), x], dim=1) + visual.positional_embedding
    x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
    x = visual.ln_post(visual.transformer(visual.ln_pre(x)))
    return x[:, 0] @ visual.proj, x[:, 1 + prompts.shape[1] :]


def test_tower_matches_open_clip_features_and_patch_tokens(bundle: Bundle, open_clip_model) -> None:
    tower = bundle.image_tower()
    images = _images(bundle, 3)
    visual = open_clip_model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            expected_features, expected_tokens = visual(images)
            features, tokens = tower(images)
    finally:
        visual.output_tokens = False
    assert tokens.shape == (3, bundle.manifest["image_tokens"], bundle.manifest["image_width"])
    assert features.shape == (3, bundle.embed_dim)
    torch.testing.assert_close(features, expected_features, rtol=0, atol=1e-5 * expected_features.abs().max())
    torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=1e-5 * expected_tokens.abs().max())


def test_prompt_tokens_are_inserted_as_vpt_shallow(bundle: Bundle, open_clip_model) -> None:
    tower = bundle.image_tower()
    images, prompts = _images(bundle, 2), _prompts(bundle, 2, 3)
    expected_features, expected_tokens = _open_clip_with_prompts(open_clip_model, images, prompts)
    with torch.no_grad():
        features, tokens = tower(images, prompts)
        unprompted, _ = tower(images)
    torch.testing.assert_close(features, expected_features, rtol=0, atol=1e-5 * expected_features.abs().max())
    torch.testing.assert_close(tokens, expected_tokens, rtol=0, atol=1e-5 * expected_tokens.abs().max())
    assert (features - unprompted).abs().max() > 1e-3 * unprompted.abs().max()  # the prompts do act


def test_no_prompts_and_empty_prompts_are_bitwise_equal(bundle: Bundle) -> None:
    tower = bundle.image_tower()
    images = _images(bundle, 2)
    with torch.no_grad():
        none = tower(images)
        empty = tower(images, _prompts(bundle, 2, 0))
    assert all(torch.equal(a, b) for a, b in zip(none, empty, strict=True))


def test_per_example_gradients_under_vmap_equal_one_at_a_time_autograd(bundle: Bundle) -> None:
    tower = bundle.image_tower()
    assert not list(tower.parameters())
    images, prompts = _images(bundle, 4), _prompts(bundle, 4, 2)
    targets = torch.randn(4, bundle.embed_dim, generator=torch.Generator().manual_seed(2))

    def loss(prompt: torch.Tensor, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        features, tokens = tower(image[None], prompt[None])
        return (features[0] - target).square().sum() + tokens.mean()

    with sdpa_kernel(SDPBackend.MATH):
        batched = vmap(grad(loss))(prompts, images, targets)
    for i in range(4):
        prompt = prompts[i].clone().requires_grad_(True)
        loss(prompt, images[i], targets[i]).backward()
        torch.testing.assert_close(batched[i], prompt.grad, rtol=1e-4, atol=1e-6 * prompt.grad.abs().max())
    assert batched.abs().max() > 0
    assert all(buffer.grad is None for buffer in tower.buffers())


@pytest.mark.parametrize(("batch", "count"), [(1, 0), (3, 0), (3, 1), (2, 5)])
def test_prompted_graph_equals_the_tower_for_any_batch_and_prompt_count(
    bundle: Bundle, batch: int, count: int
) -> None:
    tower = bundle.image_tower()
    session = bundle.image_session_prompted("fp32", providers=["cpu"])
    images, prompts = _images(bundle, batch), _prompts(bundle, batch, count)
    features, tokens = session.run(None, {"images": images.numpy(), "prompt_tokens": prompts.numpy()})
    with torch.no_grad():
        expected_features, expected_tokens = tower(images, prompts)
    scale = float(expected_features.abs().max())
    np.testing.assert_allclose(features, expected_features.numpy(), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(
        tokens, expected_tokens.numpy(), rtol=0, atol=1e-5 * expected_tokens.abs().max()
    )
    if count == 0:
        plain = bundle.image_session("fp32", providers=["cpu"]).run(None, {"images": images.numpy()})[0]
        np.testing.assert_allclose(features, plain, rtol=0, atol=1e-5 * scale)


def test_wrong_image_size_or_prompt_width_is_one_clear_error(bundle: Bundle) -> None:
    tower = bundle.image_tower()
    with pytest.raises(ValueError, match="the tower takes"):
        tower(torch.zeros(1, 3, 7, 7))
    with pytest.raises(ValueError, match="prompt tokens have width 3"):
        tower(_images(bundle, 1), torch.zeros(1, 2, 3))
