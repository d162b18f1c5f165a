"""Sample-level DP-SGD of the prompt: exact per-example gradients, clipped and noised by opacus.

Opacus' GradSampleModule cannot trace a prompt through a frozen tower, so per-example gradients
are computed with torch.func: one text-tower forward under `vjp` (the class text features do not
depend on the example), per-example gradients of the loss with respect to those text features by
`vmap(grad)`, then `vmap` of the vector-Jacobian product maps each of them back to the context.
They are handed to opacus' `DPOptimizer` (as `grad_sample`), which clips each to the clip norm,
sums, adds N(0, (sigma * clip)^2) noise and divides by the expected batch size.

Batches are Poisson samples (each example independently with rate q), as the accountant assumes;
sampling and noise use generators seeded from the OS, never from the run's shared seed.
"""

from __future__ import annotations

import secrets

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from torch.func import grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from edge_client.training import StepHook, TextEncoder, TrainStats, class_logits, make_optimizer
from fedprompt.common.settings import TrainingSettings

VMAP_CHUNK = 8  # examples per batched backward pass: bounds memory on large towers


def per_example_gradients(
    ctx: torch.Tensor,
    encode: TextEncoder,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients [B, n_ctx, W] of each example's loss with respect to ctx; also losses [B] and
    logits [B, K]. Attention runs as plain math ops here: the fused kernels have no batching rule
    for vmap and would fall back to a slow per-example loop."""
    with sdpa_kernel(SDPBackend.MATH):
        return _per_example_gradients(ctx, encode, image_features, labels, logit_scale)


def _per_example_gradients(
    ctx: torch.Tensor,
    encode: TextEncoder,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    text_features, pullback = vjp(encode, ctx)

    def example_loss(text: torch.Tensor, feature: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(class_logits(feature[None], text, logit_scale), label[None])

    text_grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(text_features, image_features, labels)
    (ctx_grads,) = vmap(pullback, chunk_size=VMAP_CHUNK)(text_grads)
    with torch.no_grad():
        logits = class_logits(image_features, text_features, logit_scale)
        losses = F.cross_entropy(logits, labels, reduction="none")
    return ctx_grads, losses, logits


def secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def train_dp_sgd(
    ctx: torch.Tensor,
    encode: TextEncoder,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float,
    settings: TrainingSettings,
    sample_rate: float,
    steps: int,
    before_step: StepHook | None = None,
) -> tuple[torch.Tensor, TrainStats]:
    """`steps` DP-SGD steps on Poisson batches of rate `sample_rate`. The caller accounts for them
    (sigma = settings.noise_multiplier, q = sample_rate, steps) before calling.

    `ctx` may pack several tensors into one vector (`encode` unpacks them): each example's gradient
    is then clipped over all of them jointly. `before_step` may re-parametrise it in place before
    every step; being a function of the previous (noised) iterate only, it is post-processing."""
    parameter = torch.nn.Parameter(ctx.detach().clone())
    noise = secret_generator()
    sampling = secret_generator()
    optimizer = DPOptimizer(
        make_optimizer([parameter], settings),
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.clip,
        expected_batch_size=max(1, round(sample_rate * len(labels))),
        generator=noise,
    )
    stats = TrainStats()
    for _ in range(steps):
        if before_step is not None:
            with torch.no_grad():
                before_step(parameter)
        batch = torch.nonzero(torch.rand(len(labels), generator=sampling) < sample_rate).flatten()
        if len(batch):
            grads, losses, logits = per_example_gradients(
                parameter.detach(), encode, image_features[batch], labels[batch], logit_scale
            )
            stats.add(losses.mean(), logits, labels[batch])
        else:  # an empty Poisson batch still takes a step: noise only, as the accountant assumes
            grads = parameter.new_zeros((0, *parameter.shape))
            stats.steps += 1
        parameter.grad_sample = grads
        optimizer.step()
        optimizer.zero_grad()
    return parameter.detach(), stats
