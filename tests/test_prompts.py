"""CoOp prompts through the frozen tower: the cut and shared-prefix encodings give the same loss and
gradient as the full-length prompts of the official codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_client.bundle import Bundle
from edge_client.prompt_encoder import PromptTextEncoder
from edge_client.prompts import PromptError, initial_context, tokenize_class_prompts
from edge_client.training import normalise, prompt_loss

CLASSES = ["cat", "golden_retriever", "a very long class name of many words", "x"]


def _tokens(bundle: Bundle, n_ctx: int = 4):
    eot = int(bundle.manifest["tokenizer"]["eot_token_id"])
    return tokenize_class_prompts(bundle.tokenizer(), CLASSES, n_ctx, eot)


def test_prompt_is_sos_context_classname_period_eot(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    tokens = _tokens(bundle)
    tokenizer = bundle.tokenizer()
    expected = tokenizer(["X X X X golden retriever."])[0]
    assert torch.equal(tokens.token_ids[1], expected)
    assert tokens.token_ids[0, 0] == bundle.manifest["tokenizer"]["sot_token_id"]
    assert int(tokens.eot_positions[3]) == 1 + 4 + 2  # "x" and "." after the context


def test_context_replaces_the_placeholders(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    tower = bundle.text_tower()
    encoder = PromptTextEncoder(tower, _tokens(bundle), "cut")
    ctx = torch.randn(4, tower.spec.width)
    assembled = encoder.prompts.assemble(ctx)
    ids = _tokens(bundle).token_ids[:, : assembled.shape[1]]
    torch.testing.assert_close(assembled[:, 1:5], ctx.expand(len(CLASSES), -1, -1))
    torch.testing.assert_close(assembled[:, 5:], tower.embed_tokens(ids)[:, 5:])
    assert assembled.shape[1] == int(encoder.prompts.eot_positions.max()) + 1 < tower.context_length


@pytest.mark.parametrize("encoding", ["cut", "shared"])
def test_exact_savings_give_the_full_length_loss_and_gradient(tiny_bundle: Path, encoding: str) -> None:
    bundle = Bundle.open(tiny_bundle)
    tower = bundle.text_tower()
    tokens = _tokens(bundle)
    generator = torch.Generator().manual_seed(0)
    images = normalise(torch.randn(6, bundle.embed_dim, generator=generator))
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    ctx = initial_context(4, tower.spec.width, 0.5, seed=1)
    results = {}
    for name in ("full", encoding):
        parameter = ctx.clone().requires_grad_(True)
        loss, _ = prompt_loss(parameter, PromptTextEncoder(tower, tokens, name), images, labels, 20.0)
        loss.backward()
        results[name] = (loss.detach(), parameter.grad)
    (full_loss, full_grad), (loss, grad) = results["full"], results[encoding]
    assert abs(float(loss - full_loss)) <= 1e-5 * abs(float(full_loss))
    assert float((grad - full_grad).norm() / full_grad.norm()) < 1e-4
    assert full_grad.norm() > 0


def test_init_is_seeded_and_context_shape_is_checked(tiny_bundle: Path) -> None:
    assert torch.equal(initial_context(4, 8, 0.02, 3), initial_context(4, 8, 0.02, 3))
    assert not torch.equal(initial_context(4, 8, 0.02, 3), initial_context(4, 8, 0.02, 4))
    bundle = Bundle.open(tiny_bundle)
    encoder = PromptTextEncoder(bundle.text_tower(), _tokens(bundle), "shared")
    with pytest.raises(PromptError, match="expected"):
        encoder(torch.zeros(5, 3))


def test_a_context_too_long_for_the_class_names_is_one_clear_error(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    with pytest.raises(PromptError, match="leaves no room for the class name"):
        _tokens(bundle, n_ctx=bundle.context_length)
