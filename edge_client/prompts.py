"""CoOp prompts: one learned context of n_ctx vectors shared by all classes.

Each class prompt is the token embedding of "X X ... X classname." with the n_ctx "X" embeddings
replaced by the context: [SOS] ctx_1..ctx_n tokens(classname) "." [EOT]. The context is a plain
tensor owned by the caller (a method may build it from several parts); this module only assembles
it with the frozen per-class token embeddings.

How many positions are kept is the caller's choice (see `edge_client.prompt_encoder`): cutting
after the last EOT of all classes is exact for a causal tower and far cheaper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedprompt.common.prompt_init import initial_context as shared_initial_context

CONTEXT_WORD = "X"


class PromptError(ValueError):
    """Class names that cannot form prompts (empty list, too long for the context length)."""


@dataclass(frozen=True)
class ClassTokens:
    """Token ids of every class prompt at the tower's full context length, and where EOT sits."""

    token_ids: torch.Tensor  # int64 [K, context_length]
    eot_positions: torch.Tensor  # int64 [K]
    n_ctx: int


def tokenize_class_prompts(
    tokenize: Callable[[list[str]], torch.Tensor], class_names: Sequence[str], n_ctx: int, eot_token_id: int
) -> ClassTokens:
    """Tokenise "X X ... X classname." for every class, as CoOp does, and check the context slots."""
    if not class_names:
        raise PromptError("no class names to build prompts from")
    texts = [" ".join([CONTEXT_WORD] * n_ctx) + f" {name.replace('_', ' ')}." for name in class_names]
    token_ids = tokenize(texts).to(torch.int64)
    is_eot = token_ids == eot_token_id
    if not bool(is_eot.any(dim=1).all()):
        raise PromptError("the tokenizer gave a prompt without an end-of-text token")
    eot_positions = is_eot.to(torch.int64).argmax(dim=1)
    too_long = [
        name for name, eot in zip(class_names, eot_positions.tolist(), strict=True) if eot <= n_ctx + 1
    ]
    if too_long:
        raise PromptError(
            f"n_ctx={n_ctx} leaves no room for the class name in the context length: {too_long[0]!r}"
        )
    context_slots = token_ids[:, 1 : n_ctx + 1]
    if not bool((context_slots == context_slots[0, 0]).all()):
        raise PromptError(f"the tokenizer did not give one token per context word {CONTEXT_WORD!r}")
    return ClassTokens(token_ids=token_ids, eot_positions=eot_positions, n_ctx=n_ctx)


class ClassPrompts:
    """The frozen parts of every class prompt, ready to be joined with a context.

    `length` is how many positions to keep: the tower's `cut_length` (up to the last EOT over all
    classes) or its full context length (the pattern of the official codes, kept for comparison).
    """

    def __init__(self, tokens: ClassTokens, token_embedding: torch.Tensor, length: int) -> None:
        with torch.no_grad():
            embedded = token_embedding[tokens.token_ids[:, :length]].to(torch.float32)
        self.n_ctx = tokens.n_ctx
        self.sos = embedded[0, :1].clone()  # [1, W]: the start token is the same for every class
        self.suffix = embedded[:, tokens.n_ctx + 1 :].clone()  # [K, S, W]: class name, ".", EOT, ...
        self.eot_positions = tokens.eot_positions.clone()

    @property
    def num_classes(self) -> int:
        return self.suffix.shape[0]

    @property
    def length(self) -> int:
        return 1 + self.n_ctx + self.suffix.shape[1]

    def prefix(self, ctx: torch.Tensor) -> torch.Tensor:
        """[1, 1 + n_ctx, W]: SOS and the context, identical for all classes."""
        expected = (self.n_ctx, self.sos.shape[1])
        if tuple(ctx.shape) != expected:
            raise PromptError(f"context of shape {tuple(ctx.shape)}, expected {expected}")
        return torch.cat([self.sos, ctx], dim=0).unsqueeze(0)

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """[K, L, W]: every class prompt with the context in place (differentiable in ctx). `ctx` is
        one context for every class [n_ctx, W], or one per class [K, n_ctx, W] (CoOp's
        class-specific context)."""
        if ctx.dim() == 3:
            expected = (self.num_classes, self.n_ctx, self.sos.shape[1])
            if tuple(ctx.shape) != expected:
                raise PromptError(f"class contexts of shape {tuple(ctx.shape)}, expected {expected}")
            return torch.cat([self.sos.expand(self.num_classes, 1, -1), ctx, self.suffix], dim=1)
        prefix = self.prefix(ctx).expand(self.num_classes, -1, -1)
        return torch.cat([prefix, self.suffix], dim=1)


def initial_context(n_ctx: int, width: int, std: float, seed: int) -> torch.Tensor:
    """CoOp's init, N(0, std^2), from a seed: the values the aggregator initialises the run with
    (`fedprompt.common.prompt_init`), so every client of a run starts alike."""
    return torch.from_numpy(shared_initial_context(n_ctx, width, std, seed))
