"""FedMVP's PromptFormer and objective: the functional PromptFormer computes what the same
architecture built from torch's own modules computes; training moves only the PromptFormer (the
tower's tensors are bitwise unchanged, every PromptFormer tensor gets a gradient, nothing else
can); the generic per-example DP-SGD path gives the one-at-a-time gradients of the full loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_client import promptformer
from edge_client.bundle import Bundle
from edge_client.dp_sgd import per_example_gradients, train_dp_sgd
from edge_client.methods.fedmvp_objective import FedMVPObjective
from edge_client.training import normalise, train_plain
from fedprompt.common.promptformer import PromptFormerShape, initial_promptformer, pooling_matrix
from fedprompt.common.settings import TrainingSettings


def _params(shape: PromptFormerShape, seed: int = 0) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(t) for name, t in initial_promptformer(shape, seed).items()}


class _ReferenceFormer(nn.Module):
    """The PromptFormer written with torch's modules, as the official code composes them."""

    def __init__(self, shape: PromptFormerShape, prompts: int) -> None:
        super().__init__()
        w, hidden = shape.width, shape.ff_mult * shape.width
        self.proj = nn.Linear(shape.text_dim, w)
        self.query_norm, self.context_norm, self.ff_norm = nn.LayerNorm(w), nn.LayerNorm(w), nn.LayerNorm(w)
        self.attn = nn.MultiheadAttention(w, shape.heads, batch_first=True)
        self.ff_in, self.ff_out = nn.Linear(w, 2 * hidden), nn.Linear(hidden, w)
        self.pool = nn.AdaptiveAvgPool1d(prompts)

    def load(self, params: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for module in ("proj", "ff_in", "ff_out"):
                getattr(self, module).weight.copy_(params[f"{module}_weight"])
                getattr(self, module).bias.copy_(params[f"{module}_bias"])
            for norm in ("query_norm", "context_norm", "ff_norm"):
                getattr(self, norm).weight.copy_(params[f"{norm}_weight"])
                getattr(self, norm).bias.copy_(params[f"{norm}_bias"])
            self.attn.in_proj_weight.copy_(params["attn_in_weight"])
            self.attn.in_proj_bias.copy_(params["attn_in_bias"])
            self.attn.out_proj.weight.copy_(params["attn_out_weight"])
            self.attn.out_proj.bias.copy_(params["attn_out_bias"])

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        context = self.context_norm(self.proj(text)).expand(len(patches), -1, -1)
        x, _ = self.attn(self.query_norm(patches), context, context)
        value, gate = self.ff_in(self.ff_norm(x)).chunk(2, dim=-1)
        x = self.ff_out(value * F.gelu(gate)) + x
        return self.pool(x.transpose(1, 2)).transpose(1, 2)


@pytest.mark.parametrize(("tokens", "prompts"), [(16, 4), (49, 4), (7, 3)])
def test_pooling_matrix_is_adaptive_average_pooling(tokens: int, prompts: int) -> None:
    x = torch.randn(2, 5, tokens)
    pooled = x @ torch.from_numpy(pooling_matrix(tokens, prompts)).T
    torch.testing.assert_close(pooled, nn.AdaptiveAvgPool1d(prompts)(x))


def test_promptformer_matches_torch_modules() -> None:
    shape = PromptFormerShape(text_dim=24, width=32, heads=4, ff_mult=2)
    params = _params(shape)
    params = {name: t + 0.05 * torch.randn_like(t) for name, t in params.items()}  # non-trivial norms, biases
    reference = _ReferenceFormer(shape, prompts=4).eval()
    reference.load(params)
    text, patches = normalise(torch.randn(10, 24)), torch.randn(3, 16, 32)
    pooling = torch.from_numpy(pooling_matrix(16, 4))
    keys_values = promptformer.context(params, text, 32)
    got = promptformer.prompts(params, keys_values, patches, shape.heads, pooling, 32)
    with torch.no_grad():
        torch.testing.assert_close(got, reference(text, patches), rtol=1e-5, atol=1e-5)


def test_parameter_count_at_vit_b_is_the_official_size() -> None:
    """512 -> 768 with 4 heads and a 4x GEGLU feed-forward: the official ~9.9M parameters."""
    count = PromptFormerShape(text_dim=512, width=768).parameter_count()
    assert 9.8e6 < count < 10.0e6


def _objective(bundle: Bundle, alpha: float = 10.0) -> tuple[FedMVPObjective, PromptFormerShape]:
    tower = bundle.image_tower()
    text = normalise(torch.randn(6, bundle.embed_dim, generator=torch.Generator().manual_seed(3)))
    shape = PromptFormerShape(text_dim=bundle.embed_dim, width=tower.spec.width, heads=4, ff_mult=2)
    objective = FedMVPObjective(tower, text, [0, 0, 1, 1, 2, 2], 3, bundle.logit_scale, 4, 4, alpha)
    return objective, shape


def _inputs(objective: FedMVPObjective, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(n, 3, *objective.tower.spec.image_size, generator=generator)
    with torch.no_grad():
        embedded = objective.tower.embed(images)
        flipped = normalise(objective.tower(images.flip(-1))[0])
    return (embedded, flipped), torch.randint(0, 3, (n,), generator=generator)


def test_training_moves_only_the_promptformer(tiny_bundle: Path) -> None:
    objective, shape = _objective(Bundle.open(tiny_bundle))
    tower = objective.tower
    assert list(tower.parameters()) == [] and not any(b.requires_grad for b in tower.buffers())
    before = {name: tensor.clone() for name, tensor in tower.state_dict().items()}
    inputs, labels = _inputs(objective, 6)
    start = _params(shape)

    trainable = {name: t.clone().requires_grad_(True) for name, t in start.items()}
    embedded = inputs[0].clone().requires_grad_(False)
    losses, _ = objective.losses(objective.shared(trainable), trainable, (embedded, inputs[1]), labels)
    losses.mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in trainable.values())
    leaves_with_grad = [t for t in (*tower.buffers(), embedded, inputs[1]) if t.grad is not None]
    assert leaves_with_grad == []

    settings = TrainingSettings(lr=0.05, batch_size=3, local_epochs=2)
    trained, stats = train_plain(objective, start, inputs, labels, settings, torch.Generator().manual_seed(0))
    assert stats.steps == 4
    assert all(not torch.equal(trained[name], start[name]) for name in ("proj_weight", "ff_out_weight"))
    after = tower.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_generic_dp_path_gives_one_at_a_time_gradients(tiny_bundle: Path) -> None:
    objective, shape = _objective(Bundle.open(tiny_bundle), alpha=2.0)
    inputs, labels = _inputs(objective, 3)
    params = {name: t + 0.02 * torch.randn_like(t) for name, t in _params(shape).items()}
    grads, losses, _ = per_example_gradients(objective, params, inputs, labels, chunk_size=2)
    for i in range(3):
        single = {name: t.clone().requires_grad_(True) for name, t in params.items()}
        example = (inputs[0][i : i + 1], inputs[1][i : i + 1])
        loss, _ = objective.losses(objective.shared(single), single, example, labels[i : i + 1])
        loss.sum().backward()
        torch.testing.assert_close(losses[i], loss[0].detach(), rtol=1e-5, atol=1e-6)
        for name, tensor in single.items():
            torch.testing.assert_close(grads[name][i], tensor.grad, rtol=1e-4, atol=1e-6)

    settings = TrainingSettings(dp="sample", clip=0.5, noise_multiplier=1.0, batch_size=2, lr=0.01)
    trained, stats = train_dp_sgd(objective, params, inputs, labels, settings, 0.7, 2, chunk_size=2)
    assert stats.steps == 2 and set(trained) == set(params)
    assert np.isfinite(sum(float(t.sum()) for t in trained.values()))


def test_image_side_exports_to_onnx_and_classifies_as_training(tiny_bundle: Path, tmp_path: Path) -> None:
    """The classifier FedMVP serves is the training objective's (head of the image side), and its
    image side runs in onnxruntime with the same features as torch."""
    import onnxruntime as ort

    from edge_client.classifier_export import HEAD_TOLERANCE, export_checked
    from edge_client.methods.fedmvp_objective import FedMVPHead, FedMVPImageEncoder

    objective, shape = _objective(Bundle.open(tiny_bundle))
    params = {name: t + 0.02 * torch.randn_like(t) for name, t in _params(shape).items()}
    images = torch.randn(5, 3, *objective.tower.spec.image_size, generator=torch.Generator().manual_seed(4))
    encoder, head = FedMVPImageEncoder(objective, params).eval(), FedMVPHead(objective)
    with torch.no_grad():
        expected = objective.classify(objective.shared(params), params, (objective.tower.embed(images),))
        torch.testing.assert_close(head(encoder(images)), expected)
    error = export_checked(encoder, images[:2], ("images", "image_features"), tmp_path / "encoder.onnx")
    assert error < HEAD_TOLERANCE
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    (features,) = session.run(["image_features"], {"images": images.numpy()})  # another batch size
    with torch.no_grad():
        np.testing.assert_allclose(features, encoder(images).numpy(), atol=1e-4)
