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
PROMPT_TOKENS = 4  # random visual prompt tokens in the prompted-graph check (the other is P = 0)


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

    @classmethod
    def between_tokens(cls, actual: np.ndarray, reference: np.ndarray) -> Agreement:
        """Token batches [N,T,W], each token compared as a feature."""
        width = reference.shape[-1]
        return cls.between(actual.reshape(-1, width), reference.reshape(-1, width))

    @classmethod
    def worst(cls, *agreements: Agreement) -> Agreement:
        return cls(
            max(a.max_abs for a in agreements),
            max(a.max_rel for a in agreements),
            min(a.min_cosine for a in agreements),
        )

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
    """Agreement of every graph in the bundle with the open_clip model, of the torch towers too, and
    of cut against full-length text sequences. Returns the manifest's "parity" entry."""
    generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**31))
    manifest = bundle.manifest
    images = torch.randn(IMAGES, 3, *manifest["image_size"], generator=generator)
    image_reference = model.encode_image(images).numpy()
    parity: dict[str, Any] = {"image": {}, "text": {}}
    plain = {}
    for precision in bundle.precisions:
        session = bundle.image_session(precision, providers=["cpu"])
        plain[precision] = session.run(None, {"images": images.numpy()})[0]
        parity["image"][precision] = Agreement.between(plain[precision], image_reference).as_dict()

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
    if "visual_prompts" in bundle.capabilities:
        parity.update(_visual_prompt_parity(model, bundle, images, plain["fp32"], generator))
    if "captioning" in bundle.capabilities:
        from export.caption_parity import measure_caption_parity

        parity["caption"] = measure_caption_parity(bundle, generator)
    return parity


def _visual_prompt_parity(
    model: nn.Module, bundle: Bundle, images: torch.Tensor, plain: np.ndarray, generator: torch.Generator
) -> dict[str, Any]:
    """The torch image tower against open_clip (features and patch tokens), the prompted graphs
    against the torch tower with P = 0 and P = PROMPT_TOKENS random prompt tokens, and the prompted
    graph with P = 0 against the plain image encoder."""
    tower = bundle.image_tower()
    reference = _open_clip_features_and_tokens(model, images)
    features, tokens = tower(images)
    empty = tower(images, images.new_zeros(len(images), 0, tower.spec.width))
    prompts = torch.randn(len(images), PROMPT_TOKENS, tower.spec.width, generator=generator)
    prompted: dict[str, Any] = {}
    outputs = {}
    for precision in bundle.parts["image_encoder_prompted"]["files"]:
        session = bundle.image_session_prompted(precision, providers=["cpu"])
        prompted[precision] = {}
        for count in (0, PROMPT_TOKENS):
            given = prompts[:, :count]
            outputs[precision, count] = session.run(
                None, {"images": images.numpy(), "prompt_tokens": given.numpy()}
            )
            agreement = _agreement_of_outputs(outputs[precision, count], tower(images, given))
            prompted[precision][f"p{count}"] = agreement.as_dict()
    return {
        "image_tower": {
            "features": Agreement.between(features.numpy(), reference[0].numpy()).as_dict(),
            "tokens": Agreement.between_tokens(tokens.numpy(), reference[1].numpy()).as_dict(),
            "empty_prompts_bitwise": all(
                torch.equal(a, b) for a, b in zip(empty, (features, tokens), strict=True)
            ),
        },
        "image_prompted": prompted,
        "image_prompted_vs_plain": Agreement.between(outputs["fp32", 0][0], plain).as_dict(),
    }


def _open_clip_features_and_tokens(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's image features and its patch tokens (VisionTransformer with output_tokens)."""
    visual = model.visual
    before = visual.output_tokens
    visual.output_tokens = True
    try:
        return visual(images)
    finally:
        visual.output_tokens = before


def _agreement_of_outputs(actual: list[np.ndarray], expected: tuple[torch.Tensor, torch.Tensor]) -> Agreement:
    """The worse of the features' and the patch tokens' agreement."""
    return Agreement.worst(
        Agreement.between(actual[0], expected[0].numpy()),
        Agreement.between_tokens(actual[1], expected[1].numpy()),
    )


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


@dataclass(frozen=True)
class ParityCheck:
    """One printed line of verify: what was compared, whether it passed, the figures and the limit."""

    label: str
    passed: bool
    detail: str


def parity_checks(parity: dict[str, Any]) -> list[ParityCheck]:
    """The checks of a manifest "parity" entry (measured now or recorded at export), in print order."""
    checks = [agreement_check(f"image {p}", numbers, p) for p, numbers in parity.get("image", {}).items()]
    checks += [agreement_check(f"text {p}", numbers, p) for p, numbers in parity.get("text", {}).items()]
    if "text_tower" in parity:
        checks.append(agreement_check("text torch", parity["text_tower"], "fp32"))
    tower = parity.get("image_tower")
    if tower is not None:
        checks.append(agreement_check("image torch", tower["features"], "fp32"))
        checks.append(agreement_check("image tokens", tower["tokens"], "fp32"))
        bitwise = bool(tower["empty_prompts_bitwise"])
        result = "bitwise equal  ok" if bitwise else "not bitwise equal  FAILED"
        checks.append(
            ParityCheck("empty prompts", bitwise, f"torch tower, None vs [N,0,Wv] prompts: {result}")
        )
    for precision, counts in parity.get("image_prompted", {}).items():
        for count, numbers in counts.items():
            checks.append(agreement_check(f"prompted {precision} P={count[1:]}", numbers, precision))
    if "image_prompted_vs_plain" in parity:
        check = agreement_check("prompted = plain", parity["image_prompted_vs_plain"], "fp32")
        checks.append(ParityCheck(check.label, check.passed, f"P=0 vs image_encoder.onnx: {check.detail}"))
    if "cut_context" in parity:
        checks.append(_cut_context_check(parity["cut_context"]))
    if "caption" in parity:
        from export.caption_parity import caption_checks

        checks += caption_checks(parity["caption"])
    return checks


def agreement_check(label: str, numbers: dict[str, float], precision: str) -> ParityCheck:
    agreement = Agreement(**numbers)
    passed = agreement.passes(precision)
    return ParityCheck(
        label,
        passed,
        f"max_abs {agreement.max_abs:.2e}  max_rel {agreement.max_rel:.2e}  "
        f"min_cos {agreement.min_cosine:.6f}  {'ok' if passed else 'FAILED'} ({limit_text(precision)})",
    )


def _cut_context_check(cut: dict[str, Any]) -> ParityCheck:
    if "length" not in cut:
        return ParityCheck("cut context", True, f"not exact: {cut['reason']}")
    passed = bool(cut["exact"])
    return ParityCheck(
        "cut context",
        passed,
        f"L={cut['length']} vs {cut['full_length']}: max_abs {cut['max_abs']:.2e}  "
        f"max_rel {cut['max_rel']:.2e}  {'ok' if passed else 'FAILED'} (rel <= {CUT_MAX_REL:g})",
    )
