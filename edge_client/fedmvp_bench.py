"""FedMVP's row of `fedprompt bench train`: one local step of fedprompt's FedMVP against the
official code's pattern, same loss and gradients.

The official code, in every step, sends every attribute sentence through the text tower at the
full context length and runs the frozen image encoder on the flipped batch for the consistency
target (and the patch embedding inside the prompted forward). All three are frozen functions of
fixed inputs, so fedprompt computes them once: the sentence features with sequences cut after the
last EOT (exact: the text tower is causal), the flipped-image features by the ONNX encoder into
the feature cache, the patch embeddings per image. The PromptFormer and the prompted tower's
blocks are what remains of a step in both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from edge_client.attributes import sentences
from edge_client.bundle import Bundle
from edge_client.methods.fedmvp_objective import FedMVPObjective
from edge_client.step_timing import compare_steps, max_rel_error
from edge_client.torch_threads import torch_threads
from edge_client.training import normalise
from fedprompt.common.promptformer import PromptFormerShape, initial_promptformer

Step = Callable[[], tuple[float, torch.Tensor]]


def bench_phrases(names: list[str]) -> dict[str, list[str]]:
    """Realistic phrases for synthetic class names: the shipped Fashion-MNIST file's, in turn."""
    shipped = json.loads(resources.files("edge_client.attributes").joinpath("fashion-mnist.json").read_text())
    lists = list(shipped.values())
    return {name: lists[i % len(lists)] for i, name in enumerate(names)}


def fedmvp_benchmark(
    bundle_dir: Path, names: list[str], batch_size: int, steps: int, precision: str, threads: int | None
) -> dict:
    """Time both steps `steps` times after a warm-up, interleaved; their loss and gradient."""
    with torch_threads(threads):
        return _benchmark(Bundle.open(bundle_dir), names, batch_size, steps, precision, threads)


def _benchmark(
    bundle: Bundle, names: list[str], batch_size: int, steps: int, precision: str, threads: int | None
) -> dict:
    bundle.require("visual_prompts")
    tower, text_tower, tokenizer = bundle.image_tower(), bundle.text_tower(), bundle.tokenizer()
    found = sentences(names, bench_phrases(names), "bench")
    tokens = tokenizer(list(found.texts))  # the full context length, as the official code tokenises
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *tower.spec.image_size, generator=generator)
    labels = torch.randint(0, len(names), (batch_size,), generator=generator)
    shape = PromptFormerShape(bundle.embed_dim, tower.spec.width)
    start = {name: torch.from_numpy(t) for name, t in initial_promptformer(shape, 0).items()}

    def objective(text: torch.Tensor) -> FedMVPObjective:
        return FedMVPObjective(
            tower, text, found.classes, len(names), bundle.logit_scale, 4, shape.heads, alpha=10.0
        )

    def step_of(make_inputs: Callable[[], tuple[FedMVPObjective, tuple[torch.Tensor, ...]]]) -> Step:
        def step() -> tuple[float, torch.Tensor]:
            target, inputs = make_inputs()
            params = {name: t.clone().requires_grad_(True) for name, t in start.items()}
            losses, _ = target.losses(target.shared(params), params, inputs, labels)
            loss = losses.mean()
            loss.backward()
            return float(loss.detach()), torch.cat([params[n].grad.flatten() for n in sorted(params)])

        return step

    @torch.no_grad()
    def official_inputs() -> tuple[FedMVPObjective, tuple[torch.Tensor, ...]]:
        text = normalise(text_tower(text_tower.embed_tokens(tokens), text_tower.eot_positions(tokens)))
        flipped = normalise(tower(images.flip(-1))[0])
        return objective(text), (tower.embed(images), flipped)

    session = bundle.image_session(precision, providers=["cpu"], threads=threads)
    with torch.no_grad():
        cached_text = normalise(text_tower.encode_token_ids(tokens))
        flipped_pixels = np.ascontiguousarray(images.flip(-1).numpy())
        cached_flipped = normalise(
            torch.from_numpy(session.run(["image_features"], {"images": flipped_pixels})[0])
        )
        cached = objective(cached_text), (tower.embed(images), cached_flipped)
    variants = {
        "official FedMVP: texts full length, encoder on flips each step": step_of(official_inputs),
        "fedprompt FedMVP: cached texts, flip features, embeddings": step_of(lambda: cached),
    }
    rows = compare_steps(variants, steps)
    return {
        "sentences": len(found.texts),
        "rows": rows,
        "speedup": rows[-1]["speedup"],
        "max_rel_error": max_rel_error(rows),
    }
