"""Contrastive pretraining of the tiny CLIP (`fedprompt-tiny`) on clean Fashion-MNIST images.

No pretrained CLIP weights can be had offline, so the project makes its own: image-caption
contrastive training on the first `--train-images` of the Fashion-MNIST train split (the rest of
the split is left for the federated clients), with captions drawn from several templates and
from names and short descriptions of the classes. Several captions of one class can share a
batch, so the loss counts every caption of the image's class as a positive (multi-positive
InfoNCE in both directions) instead of pretending that they are negatives.

Writes `fedprompt-tiny.safetensors` (fp16, to keep the committed file small) and
`fedprompt-tiny.json` with the provenance: data, seed, steps, settings, commit, sha256, timing.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from edge_client.bundle import sha256_file
from edge_client.datasets import FASHION_MNIST_CLASSES, ImageSet, load_fashion_mnist
from export.models import CONFIG_DIR, register_custom_configs
from export.quiet import quiet_root_logger

TINY_MODEL = "fedprompt-tiny"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# The files that determine the weights besides the settings; the provenance records their state.
SOURCE_FILES = (Path(__file__).resolve(), CONFIG_DIR / f"{TINY_MODEL}.json")

# Alternative wordings per class, so that the text tower learns the class rather than one string.
CLASS_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "t-shirt": ("t-shirt", "tee", "short-sleeved top"),
    "trouser": ("trouser", "pair of trousers", "pair of pants"),
    "pullover": ("pullover", "sweater", "jumper"),
    "dress": ("dress", "one-piece dress", "summer dress"),
    "coat": ("coat", "jacket", "winter coat"),
    "sandal": ("sandal", "open sandal", "summer sandal"),
    "shirt": ("shirt", "button-up shirt", "long-sleeved shirt"),
    "sneaker": ("sneaker", "trainer", "sports shoe"),
    "bag": ("bag", "handbag", "tote bag"),
    "ankle boot": ("ankle boot", "short boot", "leather boot"),
}
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a small photo of a {}.",
    "a product photo of a {}.",
    "a {}, a type of clothing.",
    "an image of a {}.",
    "a picture of one {}.",
    "{}.",
)
ZERO_SHOT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the weights (recorded in the provenance JSON)."""

    seed: int = 0
    steps: int = 600
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    train_images: int = 30_000


def create_tiny_model() -> torch.nn.Module:
    """A randomly initialised `fedprompt-tiny` (drawn from torch's current RNG state)."""
    register_custom_configs()
    with quiet_root_logger():  # "initialized randomly" is the point here, not a warning
        return open_clip.create_model(TINY_MODEL, pretrained=None)


def image_mean_std(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation of the model's image preprocessing (what the bundle's manifest records)."""
    return tuple(model.visual.preprocess_cfg["mean"]), tuple(model.visual.preprocess_cfg["std"])


def caption_bank() -> tuple[list[str], np.ndarray]:
    """Every (template, wording) caption and the class index of each."""
    captions, labels = [], []
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        for wording in CLASS_DESCRIPTIONS[name]:
            for template in TEMPLATES:
                captions.append(template.format(wording))
                labels.append(label)
    return captions, np.asarray(labels, dtype=np.int64)


def normalised_pixels(pixels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N,H,W] grayscale -> float [N,3,H,W], replicated to RGB and normalised as the bundle's
    preprocessing does (the images are already at the model's 28 px, so resize and crop are no-ops)."""
    images = (
        torch.from_numpy(np.array(pixels, dtype=np.float32)).div_(255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    )
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def multi_positive_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE where every pair of the same class is a positive."""
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    positive = labels[:, None] == labels[None, :]
    masked = logits.masked_fill(~positive, float("-inf"))
    image_to_text = torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)
    text_to_image = torch.logsumexp(logits, 0) - torch.logsumexp(masked, 0)
    return (image_to_text.mean() + text_to_image.mean()) / 2


@torch.no_grad()
def zero_shot_accuracy(model: torch.nn.Module, data: ImageSet) -> float:
    """Accuracy of the hand prompt "a photo of a {c}." on `data` (recorded in the provenance)."""
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    mean, std = image_mean_std(model)
    text = model.encode_text(tokenizer([ZERO_SHOT_TEMPLATE.format(c) for c in data.class_names]))
    text = F.normalize(text, dim=-1)
    correct = 0
    for start in range(0, len(data), 1000):
        images = normalised_pixels(data.pixels[start : start + 1000], mean, std)
        predictions = (F.normalize(model.encode_image(images), dim=-1) @ text.T).argmax(1)
        correct += int((predictions.numpy() == data.labels[start : start + 1000]).sum())
    return correct / len(data)


def source_provenance(files: tuple[Path, ...] = SOURCE_FILES) -> dict[str, object]:
    """The commit, and whether the pretraining script and the model config were unchanged from it
    (the shared checkout may have other uncommitted work, which does not touch the weights)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", *(str(p) for p in files))
    except (OSError, subprocess.CalledProcessError):
        commit, changed = "unknown", "unknown"
    return {
        "commit": commit,
        "sources_committed": changed == "",
        "sources_sha256": {p.name: sha256_file(p) for p in files},
    }


def learning_rate(step: int, settings: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + np.cos(np.pi * progress))


def pretrain_model(settings: PretrainSettings, data: ImageSet) -> tuple[torch.nn.Module, list[float]]:
    """Train `fedprompt-tiny` from scratch on `data` (uint8 pixels); returns the model and losses."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = create_tiny_model()
    mean, std = image_mean_std(model)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    captions, caption_labels = caption_bank()
    caption_tokens = tokenizer(captions)
    captions_of_class = [np.flatnonzero(caption_labels == c) for c in range(len(FASHION_MNIST_CLASSES))]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    order = np.empty(0, dtype=np.int64)
    losses = []
    model.train()
    for step in (bar := tqdm(range(settings.steps), desc="pretrain fedprompt-tiny", unit="step")):
        if len(order) < settings.batch_size:
            order = np.concatenate([order, rng.permutation(len(data))])
        batch, order = order[: settings.batch_size], order[settings.batch_size :]
        labels = data.labels[batch]
        caption_ids = np.array([rng.choice(captions_of_class[label]) for label in labels])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        image_features, text_features, logit_scale = model(
            normalised_pixels(data.pixels[batch], mean, std), caption_tokens[caption_ids]
        )[:3]
        loss = multi_positive_clip_loss(image_features, text_features, torch.from_numpy(labels), logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return model, losses


@click.command("pretrain")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=WEIGHTS_DIR,
    show_default=True,
    help="Folder for fedprompt-tiny.safetensors and its provenance JSON.",
)
@click.option("--seed", type=int, default=PretrainSettings.seed, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=PretrainSettings.steps, show_default=True)
@click.option("--batch-size", type=click.IntRange(2), default=PretrainSettings.batch_size, show_default=True)
@click.option(
    "--lr", type=float, default=PretrainSettings.lr, show_default=True, help="Peak AdamW learning rate."
)
@click.option(
    "--train-images",
    type=click.IntRange(100, 60_000),
    default=PretrainSettings.train_images,
    show_default=True,
    help="Use the first N images of the Fashion-MNIST train split; the rest "
    "stay unseen for the federated clients.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="torch CPU threads; the committed weights were made with 1 (other counts may change the "
    "order of floating-point sums, hence the last bits of the weights).",
)
def pretrain(
    out_dir: Path, seed: int, steps: int, batch_size: int, lr: float, train_images: int, threads: int
) -> None:
    """Pretrain the tiny CLIP (`fedprompt-tiny`) from scratch on clean Fashion-MNIST images.

    Reproducible from the seed; about 15 minutes on one (busy) CPU core with the defaults. Writes fp16
    safetensors plus a JSON with the provenance and the zero-shot accuracy on the test split.
    """
    torch.set_num_threads(threads)
    settings = PretrainSettings(
        seed=seed, steps=steps, batch_size=batch_size, lr=lr, train_images=train_images
    )
    train = load_fashion_mnist("train")
    data = train.subset(np.arange(settings.train_images))
    started = time.perf_counter()
    model, losses = pretrain_model(settings, data)
    seconds = time.perf_counter() - started
    accuracy = zero_shot_accuracy(model, load_fashion_mnist("test"))
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{TINY_MODEL}.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(weights))
    provenance = {
        "model": TINY_MODEL,
        "weights_file": weights.name,
        "sha256": sha256_file(weights),
        "bytes": weights.stat().st_size,
        "dtype": "float16",
        "data": {
            "dataset": "Fashion-MNIST (Zalando Research), MIT licence, Debian package dataset-fashion-mnist",
            "split": "train",
            "indices": f"0..{settings.train_images - 1}",
            "images": settings.train_images,
            "augmentation": "none (clean images only)",
        },
        "captions": {"templates": list(TEMPLATES), "class_wordings": CLASS_DESCRIPTIONS},
        "settings": asdict(settings),
        "final_loss_mean_last_20": float(np.mean(losses[-20:])),
        "zero_shot_test_accuracy": accuracy,
        "zero_shot_template": ZERO_SHOT_TEMPLATE,
        "train_seconds": round(seconds, 1),
        **source_provenance(),
        "versions": {
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
        },
    }
    (out_dir / f"{TINY_MODEL}.json").write_text(json.dumps(provenance, indent=2) + "\n")
    click.echo(
        f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB) in {seconds:.0f} s; "
        f"zero-shot accuracy on the clean test split: {accuracy:.3f}"
    )


if __name__ == "__main__":
    pretrain()
