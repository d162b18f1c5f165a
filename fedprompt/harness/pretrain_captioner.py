"""`fedprompt pretrain captioner`: the tiny T5-style captioner (`fedprompt-tiny-captioner`) on the
frozen tiny CLIP, trained from scratch on captioned scenes of PUBLIC Fashion-MNIST images.

No pretrained Flan-T5 or captioning corpus can be had offline, so the project makes its own: scenes
of the first `train_images` images of the train split (the ones the tiny CLIP was pretrained on;
the clients' images come from the rest) in the pretraining casts, each caption drawn from the
training styles at random. The CLIP image encoder is frozen (its ONNX graph gives the features);
the projection and a small T5 (transformers' T5ForConditionalGeneration) are trained together.

Writes `fedprompt-tiny-captioner.safetensors` (fp32: t5.* and projection.*), its tokenizer.json and
`fedprompt-tiny-captioner.json` with the provenance (data, seed, settings, commit, sha256, timing,
scores on scenes of test-split images).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm import tqdm
from transformers import T5Config

from edge_client.bundle import Bundle, sha256_file
from edge_client.caption_data import caption_features
from edge_client.caption_search import Decoding, generate
from edge_client.caption_tokenizer import CaptionTokenizer
from edge_client.caption_training import caption_labels
from edge_client.captioner import (
    Captioner,
    CaptionProjection,
    ProjectionSpec,
    TorchStepper,
    build_t5,
    t5_spec,
    t5_tensors,
)
from edge_client.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from export.decoder import TINY_CAPTIONER, TINY_FILES, WEIGHTS_DIR
from export.exporter import export_bundle
from export.pretrain import TINY_MODEL, source_provenance
from fedprompt.harness.caption_metrics import caption_scores
from fedprompt.harness.caption_scenes import (
    PRETRAIN_CASTS,
    TRAIN_STYLES,
    caption,
    caption_words,
    draw_scenes,
    item_word,
)
from fedprompt.harness.demo import committed_weights

SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5 (pad = decoder start)
SOURCE_FILES = (Path(__file__).resolve(), Path(__file__).with_name("caption_scenes.py"))


@dataclass(frozen=True)
class CaptionerSettings:
    """Everything that determines the weights (recorded in the provenance JSON)."""

    seed: int = 0
    train_images: int = 30_000
    scenes: int = 6000
    eval_scenes: int = 300
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    d_ff: int = 128


def word_tokenizer(words: list[str]) -> Tokenizer:
    """A word-level tokenizer over the captions' words, split on whitespace only."""
    vocab = {w: i for i, w in enumerate([*SPECIAL, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def tiny_t5_spec(settings: CaptionerSettings, vocab_size: int) -> dict:
    config = T5Config(
        vocab_size=vocab_size,
        d_model=settings.d_model,
        d_kv=settings.d_model // settings.heads,
        d_ff=settings.d_ff,
        num_layers=settings.layers,
        num_decoder_layers=settings.layers,
        num_heads=settings.heads,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return t5_spec(config)


def learning_rate(step: int, settings: CaptionerSettings) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + np.cos(np.pi * progress))


def pretrain_captioner(settings: CaptionerSettings, bundle: Bundle, out_dir: Path) -> dict:
    """Train, write the three files into `out_dir`, return the provenance."""
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    train = load_fashion_mnist("train").subset(np.arange(settings.train_images))
    canvases, scenes = draw_scenes(train, settings.scenes, PRETRAIN_CASTS, rng)
    features, patches = caption_features(bundle, (_rgb(c) for c in canvases))
    features_t, patches_t = torch.from_numpy(features), torch.from_numpy(patches)

    words = caption_words([item_word(c) for c in FASHION_MNIST_CLASSES])
    tokenizer_json = word_tokenizer(words).to_str()
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "t.json").write_text(tokenizer_json)
        tokenizer = CaptionTokenizer(Path(scratch) / "t.json", eos_id=1, pad_id=0)
    spec = tiny_t5_spec(settings, len(SPECIAL) + len(words))
    projection = CaptionProjection(
        ProjectionSpec(
            bundle.embed_dim,
            int(bundle.manifest["image_width"]),
            int(bundle.manifest["image_tokens"]),
            settings.d_model,
        )
    )
    t5 = build_t5(spec).requires_grad_(True).train()
    captioner = Captioner(projection.requires_grad_(True).train(), t5)
    optimizer = torch.optim.AdamW(captioner.parameters(), lr=settings.lr, weight_decay=0.01)
    losses = []
    started = time.perf_counter()
    for step in (bar := tqdm(range(settings.steps), desc=f"pretrain {TINY_CAPTIONER}", unit="step")):
        batch = rng.choice(len(scenes), size=settings.batch_size, replace=False)
        texts = [caption(scenes[i], str(rng.choice(TRAIN_STYLES))) for i in batch]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        loss = captioner.loss(None, features_t[batch], patches_t[batch], caption_labels(tokenizer, texts))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(captioner.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    seconds = time.perf_counter() - started
    captioner.eval().requires_grad_(False)

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / TINY_FILES["weights"]
    tensors = {f"t5.{k}": v for k, v in t5_tensors(t5).items()}
    tensors.update({f"projection.{k}": v.detach().contiguous() for k, v in projection.state_dict().items()})
    save_file(tensors, str(weights))
    (out_dir / TINY_FILES["tokenizer"]).write_text(tokenizer_json)
    scores = _evaluate(settings, bundle, out_dir, captioner, spec)
    provenance = {
        "model": TINY_CAPTIONER,
        "clip_model": TINY_MODEL,
        "clip_weights_sha256": sha256_file(committed_weights()),
        "weights_file": weights.name,
        "sha256": sha256_file(weights),
        "bytes": weights.stat().st_size,
        "dtype": "float32",
        "t5": spec,
        "projection": projection.spec.to_manifest(),
        "data": {
            "dataset": "Fashion-MNIST (Zalando Research), MIT licence, Debian package dataset-fashion-mnist",
            "split": "train",
            "indices": f"0..{settings.train_images - 1} (the tiny CLIP's pretraining images)",
            "scenes": settings.scenes,
            "casts": list(PRETRAIN_CASTS),
            "styles": list(TRAIN_STYLES),
        },
        "settings": asdict(settings),
        "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        "eval": scores,
        "train_seconds": round(seconds, 1),
        **source_provenance(SOURCE_FILES),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    (out_dir / TINY_FILES["provenance"]).write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def _rgb(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray(canvas)


def _evaluate(
    settings: CaptionerSettings, bundle: Bundle, out_dir: Path, captioner: Captioner, spec: dict
) -> dict:
    """Greedy captions (no prompt) of scenes of TEST-split images in the pretraining casts, scored
    against the captions of every training style of each scene (multi-reference)."""
    rng = np.random.default_rng(settings.seed + 1)
    canvases, scenes = draw_scenes(load_fashion_mnist("test"), settings.eval_scenes, PRETRAIN_CASTS, rng)
    features, patches = caption_features(bundle, (_rgb(c) for c in canvases))
    ids = generate(TorchStepper(captioner), None, features, patches, 0, 1, Decoding(max_tokens=32))
    tokenizer = CaptionTokenizer(out_dir / TINY_FILES["tokenizer"], eos_id=1, pad_id=0)
    hypotheses = tokenizer.decode_batch(ids)
    references = [[caption(s, style) for style in TRAIN_STYLES] for s in scenes]
    return {
        "scenes": settings.eval_scenes,
        "split": "test",
        "decoding": "greedy, no prompt",
        "references": "the scene's caption in each of the training styles",
        **caption_scores(references, hypotheses),
        "examples": [
            {"caption": h, "reference": r[0]} for h, r in zip(hypotheses[:3], references, strict=False)
        ],
    }


@click.command("captioner")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=WEIGHTS_DIR,
    show_default=True,
    help=f"Folder for {TINY_CAPTIONER}.safetensors, its tokenizer.json and its provenance JSON.",
)
@click.option("--seed", type=int, default=CaptionerSettings.seed, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=CaptionerSettings.steps, show_default=True)
@click.option("--scenes", type=click.IntRange(100), default=CaptionerSettings.scenes, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, help="torch CPU threads.")
def pretrain_captioner_command(out_dir: Path, seed: int, steps: int, scenes: int, threads: int) -> None:
    """Pretrain the tiny captioner (projection + small T5) on captioned scenes of public
    Fashion-MNIST images, on the frozen embedded tiny CLIP. Reproducible from the seed."""
    torch.set_num_threads(threads)
    settings = CaptionerSettings(seed=seed, steps=steps, scenes=scenes)
    with tempfile.TemporaryDirectory() as scratch:
        path = export_bundle(TINY_MODEL, str(committed_weights()), Path(scratch) / "clip", progress=False)
        provenance = pretrain_captioner(settings, Bundle.open(path), out_dir)
    click.echo(
        f"wrote {out_dir / TINY_FILES['weights']} ({provenance['bytes'] / 1e6:.2f} MB) in "
        f"{provenance['train_seconds']:.0f} s; on {settings.eval_scenes} test scenes (greedy, no prompt): "
        f"BLEU-4 {provenance['eval']['bleu4']:.3f}, CIDEr-D {provenance['eval']['cider_d']:.3f}"
    )
