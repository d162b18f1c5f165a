"""AFSPL's row of `fedprompt bench train`: one local step of AFSPL's client half (its
`CaptionObjective`, the loss the shared training loop steps, on the fused prompt) with the image
features cached (fedprompt: the prompted ONNX encoder's pooled feature and patch tokens, computed
once per image) against re-encoding every image in every step (the torch image tower each step, as
a training loop over raw images does); same fused prompt, same captions, loss and gradient checked.
The image encoder is frozen and the prompts sit on the decoder side, so caching is exact up to
float rounding between onnxruntime and torch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edge_client.bundle import Bundle
from edge_client.caption_training import CaptionObjective, init_fused, init_prompt
from edge_client.step_timing import compare_steps, max_rel_error
from edge_client.torch_threads import torch_threads

Step = Callable[[], tuple[float, torch.Tensor]]
CAPTION_TOKENS = 12
PROMPT_TOKENS = 16


def afspl_benchmark(bundle_dir: Path, batch_size: int, steps: int, threads: int | None) -> dict:
    with torch_threads(threads):
        return _benchmark(Bundle.open(bundle_dir), batch_size, steps, threads)


def _benchmark(bundle: Bundle, batch_size: int, steps: int, threads: int | None) -> dict:
    bundle.require("captioning")
    tower, captioner = bundle.image_tower(), bundle.captioner()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *tower.spec.image_size, generator=generator)
    vocab = int(bundle.decoder_spec["vocab_size"])
    labels = torch.randint(3, vocab, (batch_size, CAPTION_TOKENS), generator=generator)
    labels[:, -1] = int(bundle.decoder_spec["eos_token_id"])
    start = init_fused(
        init_prompt(PROMPT_TOKENS, captioner.d_model, 0.02, generator), bundle.embed_dim, 0.02, generator
    )
    start["gate_weight"] = 0.1 * torch.randn(start["gate_weight"].shape, generator=generator)
    objective = CaptionObjective(captioner)

    def step_of(encode: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Step:
        def step() -> tuple[float, torch.Tensor]:
            features, patches = encode()
            params = {name: t.clone().requires_grad_(True) for name, t in start.items()}
            losses, _ = objective.losses(None, params, (features, patches), labels)
            loss = losses.mean()
            loss.backward()
            return float(loss.detach()), torch.cat([params[n].grad.flatten() for n in sorted(params)])

        return step

    @torch.no_grad()
    def every_step() -> tuple[torch.Tensor, torch.Tensor]:
        return tower(images)

    session = bundle.image_session_prompted("fp32", providers=["cpu"], threads=threads)
    empty = np.zeros((batch_size, 0, tower.spec.width), dtype=np.float32)
    pooled, tokens = session.run(None, {"images": images.numpy(), "prompt_tokens": empty})
    cached = torch.from_numpy(pooled), torch.from_numpy(tokens)
    variants = {
        "re-encode: torch image tower on the batch each step": step_of(every_step),
        "fedprompt AFSPL: cached pooled features + patch tokens": step_of(lambda: cached),
    }
    rows = compare_steps(variants, steps)
    return {"rows": rows, "speedup": rows[-1]["speedup"], "max_rel_error": max_rel_error(rows)}
