"""How closely the exported graphs (and the torch text tower) agree with open_clip, on fresh random
inputs. Used by `export` (recorded in the manifest) and by `verify` (which fails on a bad result).

Relative error is max|actual - reference| / max|reference| over the whole feature batch: unlike an
element-wise ratio it does not explode on features that happen to be near zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_client.bundle import Bundle, encoder_file
from edge_client.text_tower import FrozenTextTower

MAX_REL = {"fp32": 1e-4, "fp16": 1e-2}  # limits on the relative error per precision
MIN_COSINE = {"int8": 0.99}  # int8 is judged by feature cosine similarity to fp32
CUT_MAX_REL = 1e-4
IMAGES = 4
SEQUENCES = 8


@dataclass(frozen=True)
class Agreement:
    """Distance between two feature batches [N,D]."""

    max_abs: float
    max_rel: float
    min_cosine: float

    @classmethod
    def between(cls, actual: np.ndarray, reference: np.ndarray) -> Agreement:
        actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
        diff = np.abs(actual - reference).max()
        norms = np.linalg.norm(actual, axis=1) * np.linalg.norm(reference, axis=1)
        cosine = (actual * reference).sum(axis=1) / np.maximum(norms, 1e-30)
        return cls(float(diff), float(diff / max(np.abs(reference).max(), 1e-30)), float(cosine.min()))

    def passes(self, precision: str) -> bool:
        if precision in MIN_COSINE:
            return self.min_cosine >= MIN_COSINE[precision]
        return self.max_rel <= MAX_REL[precision]

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def limit_text(precision: str) -> str:
    """The pass criterion of a precision, for printing next to the result."""
    return (
        f"cosine >= {MIN_COSINE[precision]}" if precision in MIN_COSINE else f"rel <= {MAX_REL[precision]:g}"
    )


def random_token_ids(
    n: int,
    context_length: int,
    vocab_size: int,
    tokens: dict[str, Any],
    max_eot: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids shaped like tokenised text: SOT, random words, EOT at a random position <= max_eot,
    zero padding. Returns (ids [n, context_length], eot_positions [n]); the first row ends at max_eot."""
    eot = torch.randint(2, max_eot + 1, (n,), generator=generator)
    eot[0] = max_eot
    ids = torch.randint(1, vocab_size - 2, (n, context_length), generator=generator)
    ids[:, 0] = tokens["sot_token_id"]
    ids[torch.arange(n), eot] = tokens["eot_token_id"]
    ids[torch.arange(context_length)[None, :] > eot[:, None]] = 0
    return ids, eot


@torch.no_grad()
def measure_parity(model: nn.Module, bundle: Bundle, seed: int | None = None) -> dict[str, Any]:
    """Agreement of every graph in the bundle with the open_clip model, the torch text tower's too,
    and of cut against full-length text sequences. Returns the manifest's "parity" entry."""
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**31))
    manifest = bundle.manifest
    images = torch.randn(IMAGES, 3, *manifest["image_size"], generator=generator)
    image_reference = model.encode_image(images).numpy()
    parity: dict[str, Any] = {"image": {}, "text": {}}
    for precision in bundle.precisions:
        session = bundle.image_session(precision, providers=["cpu"])
        actual = session.run(None, {"images": images.numpy()})[0]
        parity["image"][precision] = Agreement.between(actual, image_reference).as_dict()

    context = bundle.context_length
    tower = bundle.text_tower()
    ids, eot = random_token_ids(
        SEQUENCES, context, manifest["vocab_size"], manifest["tokenizer"], context - 1, generator
    )
    text_reference = model.encode_text(ids).numpy()
    embeddings = tower.embed_tokens(ids)
    for precision in text_precisions(bundle):
        actual = _run_text(bundle, precision, embeddings, eot)
        parity["text"][precision] = Agreement.between(actual, text_reference).as_dict()
    parity["text_tower"] = Agreement.between(tower(embeddings, eot).numpy(), text_reference).as_dict()
    parity["cut_context"] = _cut_context(bundle, tower, generator)
    return parity


def text_precisions(bundle: Bundle) -> list[str]:
    """Precisions with a text graph (int8 quantises the image encoder only)."""
    return [p for p in bundle.precisions if encoder_file("text", p) in bundle.manifest["files"]]


def _run_text(bundle: Bundle, precision: str, embeddings: torch.Tensor, eot: torch.Tensor) -> np.ndarray:
    session = bundle.text_session(precision, providers=["cpu"])
    return session.run(None, {"prompt_embeddings": embeddings.numpy(), "eot_positions": eot.numpy()})[0]


def _cut_context(bundle: Bundle, tower: FrozenTextTower, generator: torch.Generator) -> dict[str, Any]:
    """text_encoder.onnx on sequences cut after the last EOT against the same sequences at full length.
    Only a causal tower can be cut; a bidirectional one is reported as not exact."""
    if not tower.spec.causal:
        return {"exact": False, "reason": "bidirectional text tower: clients must use the full context"}
    context = bundle.context_length
    ids, eot = random_token_ids(
        SEQUENCES,
        context,
        bundle.manifest["vocab_size"],
        bundle.manifest["tokenizer"],
        context // 2,
        generator,
    )
    embeddings = tower.embed_tokens(ids)
    full = _run_text(bundle, "fp32", embeddings, eot)
    cut_length = tower.cut_length(eot)
    cut = _run_text(bundle, "fp32", embeddings[:, :cut_length], eot)
    agreement = Agreement.between(cut, full)
    return {
        "exact": agreement.max_rel <= CUT_MAX_REL,
        "length": cut_length,
        "full_length": context,
        **agreement.as_dict(),
    }
