"""Caption prompts trained through transformers' T5 in torch: the torch fused prompt equals the numpy one
generation uses, and training a prompt lowers the loss on its captions while the frozen captioner stays
unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edge_client.bundle import Bundle
from edge_client.caption_prompts import prompts_for
from edge_client.caption_training import CaptionObjective, caption_labels, fused_prompts, init_fused
from edge_client.training import train_plain
from export.caption_parity import random_image_inputs
from fedprompt.common.settings import TrainingSettings


def test_torch_and_numpy_fused_prompts_agree(caption_bundle: Path) -> None:
    bundle = Bundle.open(caption_bundle)
    generator = torch.Generator().manual_seed(0)
    d = int(bundle.decoder_spec["d_model"])
    params = init_fused(torch.randn(4, d, generator=generator), bundle.embed_dim, 0.5, generator)
    params["gate_weight"] = torch.randn(3, bundle.embed_dim, generator=generator)
    params["modality_weight"] = 0.1 * torch.randn_like(params["modality_weight"])
    features = torch.randn(5, bundle.embed_dim, generator=generator)
    expected = fused_prompts(params, features).numpy()
    actual = prompts_for({k: v.numpy() for k, v in params.items()}, features.numpy())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    shared = {"prompt": params["global"]}
    np.testing.assert_array_equal(
        prompts_for({"prompt": params["global"].numpy()}, features.numpy()),
        fused_prompts(shared, features).numpy(),
    )


def test_training_a_prompt_lowers_its_caption_loss(caption_bundle: Path) -> None:
    bundle = Bundle.open(caption_bundle)
    captioner = bundle.captioner()
    before = {k: v.clone() for k, v in captioner.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    features, patches = random_image_inputs(captioner, 16, generator)
    texts = ["a red bag on the left", "two blue shoe at the top"] * 8
    labels = caption_labels(bundle.caption_tokenizer(), texts)
    params = {"prompt": 0.02 * torch.randn(4, captioner.d_model, generator=generator)}
    settings = TrainingSettings(lr=0.05, optimizer="adam", local_epochs=1, batch_size=8)
    objective, inputs = CaptionObjective(captioner), (torch.from_numpy(features), torch.from_numpy(patches))

    def train(params: dict, settings: TrainingSettings) -> tuple[dict, float]:
        trained, stats = train_plain(objective, params, inputs, labels, settings, generator)
        return trained, stats.metrics()["train_loss"]

    _, first = train(params, settings)
    trained, _ = train(params, TrainingSettings(lr=0.1, optimizer="adam", local_epochs=8, batch_size=8))
    _, after = train(trained, settings)
    assert after < 0.95 * first
    assert all(torch.equal(v, captioner.state_dict()[k]) for k, v in before.items())
