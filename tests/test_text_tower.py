"""The torch text tower that clients train through must compute what text_encoder.onnx computes,
at full and at cut context length, and give gradients with respect to its inputs only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_client.bundle import Bundle


def _tokens(bundle: Bundle, texts: list[str]) -> torch.Tensor:
    return bundle.tokenizer()(texts)


def test_torch_tower_matches_onnx_at_full_and_cut_length(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    tower, session = bundle.text_tower(), bundle.text_session("fp32", providers=["cpu"])
    ids = _tokens(bundle, ["a photo of a cat.", "a blurry photo of a very small dog on the grass.", "x"])
    eot = tower.eot_positions(ids)
    for length in (bundle.context_length, tower.cut_length(eot)):
        embeddings = tower.embed_tokens(ids[:, :length])
        feeds = {"prompt_embeddings": embeddings.numpy(), "eot_positions": eot.numpy()}
        expected = session.run(None, feeds)[0]
        with torch.no_grad():
            actual = tower(embeddings, eot).numpy()
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert tower.cut_length(eot) < bundle.context_length


def test_cut_context_is_exact_in_torch(tiny_bundle: Path) -> None:
    tower = Bundle.open(tiny_bundle).text_tower()
    ids = _tokens(Bundle.open(tiny_bundle), ["a photo of a bird.", "two birds."])
    eot = tower.eot_positions(ids)
    with torch.no_grad():
        full = tower(tower.embed_tokens(ids), eot)
        cut = tower.encode_token_ids(ids)
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)


def test_gradients_flow_to_prompt_embeddings_only(tiny_bundle: Path) -> None:
    tower = Bundle.open(tiny_bundle).text_tower()
    assert not list(tower.parameters())
    prompts = torch.randn(4, 9, tower.spec.width, requires_grad=True)
    eot = torch.tensor([8, 3, 5, 8])
    tower(prompts, eot).square().sum().backward()
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    # causal: positions after a sequence's EOT cannot influence its feature
    assert prompts.grad[1, 4:].abs().max() == 0
    assert all(buffer.grad is None for buffer in tower.buffers())
