"""`fedprompt caption-experiment`: captioning prompts compared on the same split and seed, in one
process: the frozen captioner without prompts, local-only prompts, federated prompts with plain
FedAvg and full upload, and AFSPL (fusion of global, local and modality prompts + top-K row upload),
with and without client-level DP, plus the two ablations (fusion with full upload, top-K without
fusion). Rounds are simulated in-process with the device's training code
(`edge_client.caption_training`), upload selection (`edge_client.row_upload`), the server's row
average (`aggregator.strategies.row_average`) and the privacy mechanism and accountant of
`fedprompt.common.privacy`; the wire bytes are those of the project's tensor codec (fp16).

The split: scenes of Fashion-MNIST TEST images (never seen by either pretraining), one client per
(caption style, colour cast) pair from the training styles and the casts the captioner never saw,
each with its own four item classes; each client is scored on held-out scenes of its own style,
cast and classes (BLEU-4, CIDEr-D, greedy and beam search in onnxruntime).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image

from aggregator.strategies.row_average import average_rows
from edge_client.bundle import Bundle
from edge_client.caption_data import caption_features
from edge_client.caption_prompts import prompts_for
from edge_client.caption_search import Decoding, generate
from edge_client.caption_training import caption_labels, init_fused, init_prompt, train_caption_prompts
from edge_client.datasets import load_fashion_mnist
from edge_client.row_upload import rows_to_send, top_k_rows
from edge_client.torch_threads import torch_threads
from fedprompt.common.codec import encode_tensor_set
from fedprompt.common.privacy import (
    PrivacyAccountant,
    client_level_accounting,
    client_level_mechanism,
    secure_rng,
)
from fedprompt.common.settings import TrainingSettings
from fedprompt.harness.caption_metrics import caption_scores
from fedprompt.harness.caption_scenes import CLIENT_CASTS, TRAIN_STYLES, caption, draw_scenes

LOCAL_PARTS = ("local", "gate_weight", "gate_bias", "modality_weight", "modality_bias")


@dataclass(frozen=True)
class CaptionSplit:
    clients: int = 6
    train_scenes: int = 80
    eval_scenes: int = 30
    classes_per_client: int = 4
    seed: int = 0


@dataclass(frozen=True)
class CaptionRun:
    rounds: int = 6
    tokens: int = 16
    top_k: float = 0.3
    lr: float = 0.05
    local_epochs: int = 2
    batch_size: int = 16
    clip: float = 1.0
    noise_multiplier: float = 1.5
    delta: float = 1e-5
    max_tokens: int = 32
    beams: int = 3


@dataclass(frozen=True)
class Method:
    name: str
    federated: bool
    fusion: bool
    top_k: bool
    dp: bool


METHODS = (
    Method("frozen captioner, no prompt", False, False, False, False),
    Method("local-only prompt", False, False, False, False),
    Method("local-only fused prompt", False, True, False, False),
    Method("FedAvg, full upload", True, False, False, False),
    Method("FedAvg, full upload + DP", True, False, False, True),
    Method("fusion, full upload", True, True, False, False),
    Method("top-K upload, no fusion", True, False, True, False),
    Method("AFSPL (fusion + top-K)", True, True, True, False),
    Method("AFSPL (fusion + top-K) + DP", True, True, True, True),
)


@dataclass
class ClientData:
    style: str
    cast: str
    train: tuple[np.ndarray, np.ndarray, torch.Tensor]  # features, patches, labels
    eval: tuple[np.ndarray, np.ndarray, list[list[str]]]  # features, patches, references


def make_clients(bundle: Bundle, split: CaptionSplit) -> list[ClientData]:
    rng = np.random.default_rng(split.seed)
    images = load_fashion_mnist("test")
    tokenizer = bundle.caption_tokenizer()
    clients = []
    for index in range(split.clients):
        style, cast = TRAIN_STYLES[index % len(TRAIN_STYLES)], CLIENT_CASTS[index % len(CLIENT_CASTS)]
        classes = rng.choice(10, size=split.classes_per_client, replace=False)
        canvases, scenes = draw_scenes(
            images, split.train_scenes + split.eval_scenes, (cast,), rng, classes=classes
        )
        features, patches = caption_features(bundle, (Image.fromarray(c) for c in canvases))
        n = split.train_scenes
        labels = caption_labels(tokenizer, [caption(s, style) for s in scenes[:n]])
        references = [[caption(s, style)] for s in scenes[n:]]
        clients.append(
            ClientData(
                style, cast, (features[:n], patches[:n], labels), (features[n:], patches[n:], references)
            )
        )
    return clients


def run_method(bundle: Bundle, clients: list[ClientData], method: Method, run: CaptionRun, seed: int) -> dict:
    """Train (unless frozen), then score every client on its held-out scenes."""
    captioner = bundle.captioner()
    d_model = captioner.d_model
    generator = torch.Generator().manual_seed(seed)
    settings = TrainingSettings(
        lr=run.lr, optimizer="adam", local_epochs=run.local_epochs, batch_size=run.batch_size
    )
    global_prompt = init_prompt(run.tokens, d_model, 0.02, torch.Generator().manual_seed(seed))
    state: list[dict[str, torch.Tensor]] = [{} for _ in clients]
    bytes_up: list[int] = []
    accountant = PrivacyAccountant()
    if method.name.startswith("frozen"):
        prompts = [None] * len(clients)
    elif not method.federated:
        local = replace(settings, local_epochs=run.local_epochs * run.rounds)
        prompts = []
        for client in clients:
            params = _client_params(method, global_prompt, {}, bundle.embed_dim, generator)
            trained, _ = train_caption_prompts(captioner, params, *client.train, local, generator)
            prompts.append({k: v.numpy() for k, v in trained.items()})
    else:
        k = rows_to_send(run.tokens, run.top_k) if method.top_k else run.tokens
        for _ in range(run.rounds):
            uploads = []
            for index, client in enumerate(clients):
                params = _client_params(method, global_prompt, state[index], bundle.embed_dim, generator)
                trained, _ = train_caption_prompts(captioner, params, *client.train, settings, generator)
                name = "global" if method.fusion else "prompt"
                state[index] = {p: trained[p] for p in LOCAL_PARTS if p in trained}
                update = {"rows": (trained[name] - global_prompt).numpy()}
                if method.dp:
                    update, _ = client_level_mechanism(update, run.clip, run.noise_multiplier, secure_rng())
                indices, rows = top_k_rows(update["rows"], k)
                sent = {"rows": rows, "indices": indices.astype(np.float32)} if method.top_k else update
                bytes_up.append(len(encode_tensor_set(sent, "fp16")))
                uploads.append((indices, rows, float(len(client.train[2]))))
            if method.dp:
                accountant.step(**client_level_accounting(run.noise_multiplier))
            new, _ = average_rows(global_prompt.numpy(), uploads)
            global_prompt = torch.from_numpy(new)
        prompts = [
            {
                k: v.numpy()
                for k, v in _client_params(
                    method, global_prompt, state[i], bundle.embed_dim, generator
                ).items()
            }
            for i in range(len(clients))
        ]
    return _score(bundle, clients, prompts, run) | {
        "bytes_up_per_client_round": int(np.mean(bytes_up)) if bytes_up else 0,
        "epsilon": accountant.epsilon(run.delta) if method.dp else None,
    }


def _client_params(
    method: Method, global_prompt: torch.Tensor, local: dict, image_dim: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    if not method.fusion:
        return {"prompt": global_prompt}
    params = init_fused(global_prompt, image_dim, 0.02, generator) if not local else {"global": global_prompt}
    return params | local


def _score(bundle: Bundle, clients: list[ClientData], prompts: list, run: CaptionRun) -> dict:
    stepper = bundle.caption_stepper(providers=["cpu"])
    tokenizer = bundle.caption_tokenizer()
    spec = bundle.decoder_spec
    start, eos = int(spec["decoder_start_token_id"]), int(spec["eos_token_id"])
    results: dict[str, list[float]] = {}
    examples = []
    for client, parts in zip(clients, prompts, strict=True):
        features, patches, references = client.eval
        prompt = prompts_for(parts, features)
        for label, beams in (("greedy", 1), ("beam", run.beams)):
            ids = generate(stepper, prompt, features, patches, start, eos, Decoding(run.max_tokens, beams))
            hypotheses = tokenizer.decode_batch(ids)
            for metric, value in caption_scores(references, hypotheses).items():
                results.setdefault(f"{metric}_{label}", []).append(value)
            if label == "greedy":
                examples.append(
                    {"style": client.style, "caption": hypotheses[0], "reference": references[0][0]}
                )
    return {key: float(np.mean(values)) for key, values in results.items()} | {"examples": examples[:2]}


def run_experiment(bundle: Bundle, split: CaptionSplit, run: CaptionRun, threads: int = 1) -> dict:
    started = time.perf_counter()
    with torch_threads(threads):
        clients = make_clients(bundle, split)
        rows = []
        for method in METHODS:
            began = time.perf_counter()
            row = run_method(bundle, clients, method, run, split.seed)
            rows.append({"method": method.name, **row, "seconds": round(time.perf_counter() - began, 1)})
            click.echo(_row_line(rows[-1]), err=True)
    return {
        "split": asdict(split),
        "run": asdict(run),
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _row_line(row: dict) -> str:
    eps = "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}"
    return (
        f"| {row['method']} | {row['bleu4_greedy']:.3f} | {row['cider_d_greedy']:.3f} | "
        f"{row['bleu4_beam']:.3f} | {row['cider_d_beam']:.3f} | {row['bytes_up_per_client_round']} | {eps} |"
    )


def markdown_table(result: dict) -> str:
    beams = result["run"]["beams"]
    lines = [
        f"| method | BLEU-4 greedy | CIDEr-D greedy | BLEU-4 beam {beams} | CIDEr-D beam {beams} "
        "| bytes up/client/round | epsilon |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join([*lines, *(_row_line(r) for r in result["rows"])])


@click.command("caption-experiment")
@click.option(
    "--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="A captioning bundle."
)
@click.option("--clients", type=click.IntRange(1), default=CaptionSplit.clients, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=CaptionRun.rounds, show_default=True)
@click.option("--seed", type=int, default=CaptionSplit.seed, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write every figure here.")
def caption_experiment_command(
    bundle_dir: Path, clients: int, rounds: int, seed: int, threads: int, json_path: Path | None
) -> None:
    """Compare captioning prompts (frozen, local-only, FedAvg, AFSPL, ablations, DP) in one process
    on scenes of unseen Fashion-MNIST images; prints a markdown table."""
    bundle = Bundle.open(bundle_dir)
    bundle.require("captioning")
    result = run_experiment(
        bundle, CaptionSplit(clients=clients, seed=seed), CaptionRun(rounds=rounds), threads
    )
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
    click.echo(markdown_table(result))
    click.echo(f"({result['seconds']:.0f} s)")
