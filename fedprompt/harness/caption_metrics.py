"""BLEU-4 and CIDEr-D of generated captions, by pycocoevalcap's scorers (the COCO caption
evaluation code; no scorer of our own). Captions here are lower-case words separated by spaces,
so they are split on whitespace instead of by the Java PTB tokenizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider


def caption_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D (pycocoevalcap's Cider is CIDEr-D: clipped counts, Gaussian
    length penalty, sigma 6) of one hypothesis per image against its references."""
    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError("one hypothesis per image and at least one image are needed")
    refs: Mapping[int, list[str]] = {i: [_clean(r) for r in rs] for i, rs in enumerate(references)}
    hyps: Mapping[int, list[str]] = {i: [_clean(h) or "<empty>"] for i, h in enumerate(hypotheses)}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    return {"bleu4": float(bleu[3]), "cider_d": float(cider)}


def _clean(text: str) -> str:
    return " ".join(text.lower().split())
