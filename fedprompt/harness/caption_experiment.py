"""`fedprompt caption-experiment`: captioning prompts compared on the same split and seed: the
frozen captioner without prompts, local-only prompts, federated prompts with plain FedAvg and full
upload, and AFSPL (fusion of global, local and modality prompts + top-K row upload), with and
without client-level DP, plus the two ablations (fusion with full upload, top-K without fusion).

Every trained row is the AFSPL method itself (`fedprompt.common.methods.afspl`) at some settings,
played by the daemon's round coordinator, store and server half with the devices' client halves in
one process (`fedprompt.harness.in_process`): `gate = "none"` is the shared prompt without fusion,
`top_k_fraction = 1` the full upload (the per-row average of every row is FedAvg of the prompt),
and the local-only rows are the same method with each client in a federation of its own. Bytes up
are those the coordinator counted on its wire encoding (fp16); epsilon is the devices' accountant's.
Each client is scored with the prompt file its client half left in its state folder (what
`fedprompt caption` reads).

The split: scenes of Fashion-MNIST TEST images (never seen by either pretraining), one client per
(caption style, colour cast) pair from the training styles and the casts the captioner never saw,
each with its own four item classes; each client is scored on held-out scenes of its own style,
cast and classes (BLEU-4, CIDEr-D, greedy and beam search in onnxruntime).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from PIL import Image

from edge_client.bundle import Bundle
from edge_client.caption_data import caption_features
from edge_client.caption_prompts import load_prompt_parts, prompts_for
from edge_client.caption_search import Decoding, generate
from edge_client.caption_training import caption_labels
from edge_client.caption_workspace import CaptionedFeatures, CaptionWorkspace
from edge_client.datasets import load_fashion_mnist
from edge_client.torch_threads import torch_threads
from fedprompt.common.methods import RunSettings
from fedprompt.harness.caption_metrics import caption_scores
from fedprompt.harness.caption_scenes import CLIENT_CASTS, TRAIN_STYLES, caption, draw_scenes
from fedprompt.harness.in_process import FederationRules, run_federated


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
    trained: bool = True
    federated: bool = True  # False: each client in a federation of its own (local-only)
    fusion: bool = True
    top_k: bool = True
    dp: bool = False

    def settings(self, run: CaptionRun, seed: int) -> RunSettings:
        """The AFSPL settings of this row."""
        return RunSettings.from_flat(
            "afspl",
            {
                "prompt_tokens": run.tokens,
                "top_k_fraction": run.top_k if self.top_k else 1.0,
                "gate": "softmax" if self.fusion else "none",
                "lr": run.lr,
                "optimizer": "adam",
                "local_epochs": run.local_epochs,
                "batch_size": run.batch_size,
                "seed": seed,
                "dp": "client" if self.dp else "none",
                "clip": run.clip,
                "noise_multiplier": run.noise_multiplier,
                "delta": run.delta,
            },
        )


METHODS = (
    Method("frozen captioner, no prompt", trained=False),
    Method("local-only prompt", federated=False, fusion=False, top_k=False),
    Method("local-only fused prompt", federated=False, top_k=False),
    Method("FedAvg, full upload", fusion=False, top_k=False),
    Method("FedAvg, full upload + DP", fusion=False, top_k=False, dp=True),
    Method("fusion, full upload", top_k=False),
    Method("top-K upload, no fusion", fusion=False),
    Method("AFSPL (fusion + top-K)"),
    Method("AFSPL (fusion + top-K) + DP", dp=True),
)


@dataclass
class ClientData:
    style: str
    cast: str
    train: CaptionedFeatures
    eval: CaptionedFeatures
    references: list[list[str]]


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
        features, patches = (
            torch.from_numpy(a) for a in caption_features(bundle, (Image.fromarray(c) for c in canvases))
        )
        captions = [caption(s, style) for s in scenes]
        n = split.train_scenes

        train, held_out = (
            captioned(features[rows], patches[rows], captions[rows], tokenizer)
            for rows in (slice(0, n), slice(n, None))
        )
        clients.append(ClientData(style, cast, train, held_out, [[c] for c in held_out.captions]))
    return clients


def captioned(
    features: torch.Tensor, patches: torch.Tensor, captions: list[str], tokenizer: Any
) -> CaptionedFeatures:
    return CaptionedFeatures(features, patches, caption_labels(tokenizer, captions), tuple(captions))


def run_method(bundle: Bundle, clients: list[ClientData], method: Method, run: CaptionRun, seed: int) -> dict:
    """Train (unless frozen) through the method's two halves, then score every client's prompts."""
    if not method.trained:
        return _score(bundle, clients, [None] * len(clients), run) | {
            "bytes_up_per_client_round": 0,
            "epsilon": None,
        }
    settings = method.settings(run, seed)
    rules = FederationRules(rounds=run.rounds, seed=seed)
    with tempfile.TemporaryDirectory(prefix="caption-experiment-") as tmp:
        root = Path(tmp)
        workspaces = [
            CaptionWorkspace(bundle, c.train, c.eval, root / f"client{i}") for i, c in enumerate(clients)
        ]
        groups = [workspaces] if method.federated else [[ws] for ws in workspaces]
        records = []
        for number, group in enumerate(groups):
            federation = run_federated(settings, group, rules, root / f"state{number}.sqlite", classify=False)
            records += federation.rounds
        prompts = [load_prompt_parts(ws.state_dir) for ws in workspaces]
    epsilons = [r.metrics["epsilon_max"] for r in records if r.metrics["epsilon_max"] is not None]
    return _score(bundle, clients, prompts, run) | {
        "bytes_up_per_client_round": int(np.mean([c.bytes_up for r in records for c in r.clients])),
        "epsilon": max(epsilons) if epsilons else None,
    }


def _score(
    bundle: Bundle, clients: list[ClientData], prompts: list[dict[str, np.ndarray] | None], run: CaptionRun
) -> dict[str, Any]:
    stepper = bundle.caption_stepper(providers=["cpu"])
    tokenizer = bundle.caption_tokenizer()
    spec = bundle.decoder_spec
    start, eos = int(spec["decoder_start_token_id"]), int(spec["eos_token_id"])
    results: dict[str, list[float]] = {}
    examples = []
    for client, parts in zip(clients, prompts, strict=True):
        features, patches, references = (
            client.eval.features.numpy(),
            client.eval.patches.numpy(),
            client.references,
        )
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
