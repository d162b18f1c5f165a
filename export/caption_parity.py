"""How closely the captioner's ONNX graphs agree with transformers' T5 in torch, on fresh random
inputs: encoder states with and without soft prompts, decoder logits stepped with past keys/values
against a teacher-forced torch forward, and generations (greedy and beam) that must be identical.
Recorded by export in the manifest's parity["caption"], re-measured by verify."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edge_client.bundle import Bundle
from edge_client.caption_search import Decoding, generate
from edge_client.captioner import Captioner, TorchStepper
from export.parity import Agreement, ParityCheck, agreement_check

CAPTION_IMAGES = 4
PROMPT_TOKENS = 4
TEACHER_TOKENS = 6
BEAMS = 3
MAX_TOKENS = 12


def random_image_inputs(captioner: Captioner, n: int, generator: torch.Generator) -> tuple[np.ndarray, ...]:
    spec = captioner.projection.spec
    features = torch.randn(n, spec.image_dim, generator=generator)
    patches = torch.randn(n, spec.patch_tokens, spec.patch_width, generator=generator)
    return features.numpy(), patches.numpy()


@torch.no_grad()
def measure_caption_parity(bundle: Bundle, generator: torch.Generator) -> dict[str, Any]:
    captioner = bundle.captioner()
    onnx = bundle.caption_stepper(providers=["cpu"])
    torch_steps = TorchStepper(captioner)
    spec = bundle.decoder_spec
    features, patches = random_image_inputs(captioner, CAPTION_IMAGES, generator)
    prompt = (
        0.5 * torch.randn(CAPTION_IMAGES, PROMPT_TOKENS, captioner.d_model, generator=generator)
    ).numpy()
    parity: dict[str, Any] = {"encoder": {}}
    for count in (0, PROMPT_TOKENS):
        given = prompt[:, :count]
        actual = onnx.encode(given, features, patches)
        expected = captioner.encoder_states(*(torch.from_numpy(a) for a in (given, features, patches)))
        parity["encoder"][f"p{count}"] = Agreement.between_tokens(actual, expected.numpy()).as_dict()

    states = torch.from_numpy(onnx.encode(prompt, features, patches))
    tokens = torch.randint(2, int(spec["vocab_size"]), (CAPTION_IMAGES, TEACHER_TOKENS), generator=generator)
    tokens[:, 0] = int(spec["decoder_start_token_id"])
    expected = captioner.logits(states, tokens).numpy()
    state = (states.numpy(), onnx.start(prompt, features, patches)[1])
    stepped = []
    for position in range(TEACHER_TOKENS):
        logits, state = onnx.step(tokens[:, position].numpy(), state)
        stepped.append(logits)
    actual = np.stack(stepped, axis=1)
    parity["decoder_logits"] = Agreement.between_tokens(actual, expected).as_dict()

    start, eos = int(spec["decoder_start_token_id"]), int(spec["eos_token_id"])
    greedy = Decoding(max_tokens=MAX_TOKENS)
    beam = Decoding(max_tokens=MAX_TOKENS, beams=BEAMS)
    ours = generate(onnx, prompt, features, patches, start, eos, greedy)
    reference = generate(torch_steps, prompt, features, patches, start, eos, greedy)
    hf = _transformers_greedy(captioner, prompt, features, patches, eos, MAX_TOKENS)
    parity["greedy"] = {
        "captions": CAPTION_IMAGES,
        "onnx_equals_torch": ours == reference,
        "torch_equals_transformers_generate": reference == hf,
    }
    parity["beam"] = {
        "captions": CAPTION_IMAGES,
        "beams": BEAMS,
        "onnx_equals_torch": generate(onnx, prompt, features, patches, start, eos, beam)
        == generate(torch_steps, prompt, features, patches, start, eos, beam),
    }
    return parity


def _transformers_greedy(
    captioner: Captioner,
    prompt: np.ndarray,
    features: np.ndarray,
    patches: np.ndarray,
    eos: int,
    max_tokens: int,
) -> list[list[int]]:
    """transformers' own greedy generate on the same encoder states (EOS and after removed)."""
    from transformers.modeling_outputs import BaseModelOutput

    states = captioner.encoder_states(*(torch.from_numpy(a) for a in (prompt, features, patches)))
    out = captioner.t5.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=states),
        max_new_tokens=max_tokens,
        do_sample=False,
        num_beams=1,
        min_length=0,
    )
    captions = []
    for row in out[:, 1:].tolist():
        captions.append(row[: row.index(eos)] if eos in row else row)
    return captions


def caption_checks(parity: dict[str, Any]) -> list[ParityCheck]:
    """The printed checks of parity["caption"]."""
    checks = [
        agreement_check(f"caption enc P={count[1:]}", numbers, "fp32")
        for count, numbers in parity["encoder"].items()
    ]
    logits = agreement_check("decoder logits", parity["decoder_logits"], "fp32")
    checks.append(ParityCheck(logits.label, logits.passed, f"stepped with past vs torch: {logits.detail}"))
    greedy, beam = parity["greedy"], parity["beam"]
    for label, passed, what in (
        ("greedy", greedy["onnx_equals_torch"], f"{greedy['captions']} captions, onnxruntime vs torch"),
        (
            "greedy reference",
            greedy["torch_equals_transformers_generate"],
            "torch steps vs transformers' generate",
        ),
        (
            "beam",
            beam["onnx_equals_torch"],
            f"{beam['captions']} captions, {beam['beams']} beams, onnxruntime vs torch",
        ),
    ):
        checks.append(
            ParityCheck(label, bool(passed), f"{what}: {'identical  ok' if passed else 'differ  FAILED'}")
        )
    return checks
