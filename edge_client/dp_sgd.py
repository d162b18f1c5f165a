"""Sample-level DP-SGD of any `Objective`: exact per-example gradients over all its trainable
tensors jointly, clipped and noised by opacus.

Opacus' GradSampleModule cannot trace tensors through a frozen tower, so per-example gradients are
computed with torch.func, on one of two exact paths:

- generic: `vmap(grad(loss of one example))` over the examples, in chunks of `chunk_size`
  examples (bounds memory: a chunk's activations through a tower are alive at once);
- fast, when the objective declares `example_independent` (the trainable tensors reach the loss
  only through `shared(params)`, e.g. CoOp's class text features): one `vjp` of `shared`, the
  per-example gradients with respect to its output by `vmap(grad)`, then `vmap` of the
  vector-Jacobian product maps each back to the tensors: one tower pass per batch, not per example.

They are handed to opacus' `DPOptimizer` (as `grad_sample` of every tensor), which clips each
example's gradient to the clip norm over all tensors together, sums, adds N(0, (sigma * clip)^2)
noise to every coordinate and divides by the expected batch size.

Batches are Poisson samples (each example independently with rate q), as the accountant assumes;
sampling and noise use generators seeded from the OS, never from the run's shared seed.
"""

from __future__ import annotations

import secrets
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch.func import grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from edge_client.training import Inputs, Objective, Params, TrainStats, make_optimizer, select
from fedprompt.common.settings import TrainingSettings

VMAP_CHUNK = 8  # examples per batched backward pass: bounds memory on large towers


def per_example_gradients(
    objective: Objective,
    params: Params,
    inputs: Inputs,
    labels: torch.Tensor,
    chunk_size: int = VMAP_CHUNK,
    fast: bool | None = None,
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Gradients {name: [B, *shape]} of each example's loss, its losses [B] and logits [B, K].
    `fast` None takes the fast path when the objective allows it. Attention runs as plain math ops
    here: the fused kernels have no batching rule for vmap and would fall back to a slow loop."""
    fast = objective.example_independent if fast is None else fast
    if fast and not objective.example_independent:
        raise ValueError("the fast path needs an objective whose tensors act only through shared()")
    frozen = {name: tensor.detach() for name, tensor in params.items()}
    with sdpa_kernel(SDPBackend.MATH):
        if fast:
            return _through_shared(objective, frozen, inputs, labels, chunk_size)
        return _generic(objective, frozen, inputs, labels, chunk_size)


def _example_loss(objective: Objective, shared: Any, params: Params, example: Inputs) -> tuple:
    """(loss, (loss, logits)) of one example (inputs..., label), each without the batch dimension."""
    *inputs, label = (tensor[None] for tensor in example)
    losses, logits = objective.losses(shared, params, tuple(inputs), label)
    return losses[0], (losses[0].detach(), logits[0].detach())


def _generic(
    objective: Objective, params: Params, inputs: Inputs, labels: torch.Tensor, chunk_size: int
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    def one(p: Params, *example: torch.Tensor) -> tuple:
        return _example_loss(objective, objective.shared(p), p, example)

    in_dims = (None, *[0] * (len(inputs) + 1))
    grads, (losses, logits) = vmap(grad(one, has_aux=True), in_dims=in_dims, chunk_size=chunk_size)(
        params, *inputs, labels
    )
    return grads, losses, logits


def _through_shared(
    objective: Objective, params: Params, inputs: Inputs, labels: torch.Tensor, chunk_size: int
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    shared, pullback = vjp(objective.shared, params)

    def one(s: Any, *example: torch.Tensor) -> tuple:
        return _example_loss(objective, s, params, example)

    in_dims = (None, *[0] * (len(inputs) + 1))
    shared_grads, (losses, logits) = vmap(grad(one, has_aux=True), in_dims=in_dims)(shared, *inputs, labels)
    (grads,) = vmap(pullback, chunk_size=chunk_size)(shared_grads)
    return grads, losses, logits


def secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def train_dp_sgd(
    objective: Objective,
    params: Params,
    inputs: Inputs,
    labels: torch.Tensor,
    settings: TrainingSettings,
    sample_rate: float,
    steps: int,
    chunk_size: int = VMAP_CHUNK,
) -> tuple[Params, TrainStats]:
    """`steps` DP-SGD steps on Poisson batches of rate `sample_rate`. The caller accounts for them
    (sigma = settings.noise_multiplier, q = sample_rate, steps) before calling. Each example's
    gradient is clipped over all of `params` jointly. Returns the new tensors."""
    trained = {name: torch.nn.Parameter(tensor.detach().clone()) for name, tensor in params.items()}
    noise = secret_generator()
    sampling = secret_generator()
    optimizer = DPOptimizer(
        make_optimizer(list(trained.values()), settings),
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.clip,
        expected_batch_size=max(1, round(sample_rate * len(labels))),
        generator=noise,
    )
    stats = TrainStats()
    for _ in range(steps):
        with torch.no_grad():
            objective.before_step(trained)
        batch = torch.nonzero(torch.rand(len(labels), generator=sampling) < sample_rate).flatten()
        if len(batch):
            grads, losses, logits = per_example_gradients(
                objective, trained, select(inputs, batch), labels[batch], chunk_size
            )
            stats.add(losses.mean(), logits, labels[batch])
        else:  # an empty Poisson batch still takes a step: noise only, as the accountant assumes
            grads = {name: p.new_zeros((0, *p.shape)) for name, p in trained.items()}
            stats.steps += 1
        for name, parameter in trained.items():
            parameter.grad_sample = grads[name]
        optimizer.step()
        optimizer.zero_grad()
    return {name: parameter.detach() for name, parameter in trained.items()}, stats
