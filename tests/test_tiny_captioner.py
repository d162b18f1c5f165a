"""The committed tiny captioner: its file matches its provenance, a bundle of the tiny CLIP with it
exports and verifies offline, and it writes the right caption of real scenes; `fedprompt caption`
with a prompt trained on a client's style writes the held-out captions the in-process generation
writes, closer to that style than the frozen captioner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edge_client.bundle import Bundle, sha256_file
from edge_client.caption_data import caption_features, open_images
from edge_client.caption_prompts import prompts_for, save_prompt_parts
from edge_client.caption_search import Decoding, generate
from edge_client.caption_training import CaptionObjective, caption_labels, init_prompt
from edge_client.datasets import fashion_mnist_dir, load_fashion_mnist
from edge_client.training import train_plain
from export.decoder import TINY_CAPTIONER, TINY_FILES, WEIGHTS_DIR
from fedprompt.cli import main
from fedprompt.common.settings import TrainingSettings
from fedprompt.harness.caption_metrics import caption_scores
from fedprompt.harness.caption_scenes import caption, draw_scenes, write_scenes
from fedprompt.harness.demo import committed_weights

PROVENANCE = json.loads((WEIGHTS_DIR / TINY_FILES["provenance"]).read_text())
needs_data = pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST data absent"
)


def test_weights_match_their_provenance_and_stay_small() -> None:
    weights = WEIGHTS_DIR / TINY_FILES["weights"]
    assert (
        sha256_file(weights) == PROVENANCE["sha256"] and weights.stat().st_size == PROVENANCE["bytes"] < 2**20
    )
    assert PROVENANCE["clip_weights_sha256"] == sha256_file(committed_weights())
    assert PROVENANCE["data"]["split"] == "train" and PROVENANCE["eval"]["split"] == "test"


@pytest.fixture(scope="module")
def tiny_caption_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import export_bundle

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    return export_bundle(
        "fedprompt-tiny", str(committed_weights()), out, progress=False, decoder=TINY_CAPTIONER
    )


def test_the_tiny_captioner_bundle_verifies_offline(tiny_caption_bundle: Path) -> None:
    bundle = Bundle.open(tiny_caption_bundle)
    assert bundle.parts["caption_projection"]["init"] == "trained"
    assert bundle.parts["decoder"]["source"] == {
        "kind": "embedded",
        "value": TINY_CAPTIONER,
        "sha256": PROVENANCE["sha256"],
    }
    result = CliRunner().invoke(main, ["verify", str(tiny_caption_bundle)])
    assert result.exit_code == 0, result.output
    assert "verify: all checks passed" in result.output.splitlines()


@needs_data
def test_a_prompt_trained_on_a_client_style_is_what_fedprompt_caption_writes(
    tiny_caption_bundle: Path, tmp_path: Path
) -> None:
    bundle = Bundle.open(tiny_caption_bundle)
    rng = np.random.default_rng(0)
    canvases, scenes = draw_scenes(load_fashion_mnist("test"), 72, ("orange",), rng)
    style = "count"
    paths = write_scenes(tmp_path / "client", canvases, [caption(s, style) for s in scenes])
    features, patches = caption_features(bundle, open_images(paths))
    captioner = bundle.captioner()
    labels = caption_labels(bundle.caption_tokenizer(), [caption(s, style) for s in scenes[:60]])
    generator = torch.Generator().manual_seed(0)
    params = {"prompt": init_prompt(8, captioner.d_model, 0.02, generator)}
    settings = TrainingSettings(lr=0.05, optimizer="adam", local_epochs=10, batch_size=16)
    inputs = (torch.from_numpy(features[:60]), torch.from_numpy(patches[:60]))
    trained, _ = train_plain(CaptionObjective(captioner), params, inputs, labels, settings, generator)
    save_prompt_parts(tmp_path / "state", {k: v.numpy() for k, v in trained.items()})

    held_out = [str(p) for p in paths[60:]]
    result = CliRunner().invoke(
        main,
        [
            "caption",
            "--bundle",
            str(tiny_caption_bundle),
            "--state-dir",
            str(tmp_path / "state"),
            "--json",
            *held_out,
        ],
    )
    assert result.exit_code == 0, result.output
    written = [row["caption"] for row in json.loads(result.output)]
    spec = bundle.decoder_spec
    prompt = prompts_for({"prompt": trained["prompt"].numpy()}, features[60:])
    ids = generate(
        bundle.caption_stepper(), prompt, features[60:], patches[60:], 0, spec["eos_token_id"], Decoding(32)
    )
    assert written == bundle.caption_tokenizer().decode_batch(ids)

    references = [[caption(s, style)] for s in scenes[60:]]
    frozen = generate(
        bundle.caption_stepper(), None, features[60:], patches[60:], 0, spec["eos_token_id"], Decoding(32)
    )
    prompted_score = caption_scores(references, written)["bleu4"]
    frozen_score = caption_scores(references, bundle.caption_tokenizer().decode_batch(frozen))["bleu4"]
    assert prompted_score > frozen_score + 0.1, (prompted_score, frozen_score)
