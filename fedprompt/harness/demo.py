"""`fedprompt demo`: the whole product on the embedded default, offline, on one machine.

1. export the project's own tiny CLIP (export/weights, pretrained on clean Fashion-MNIST images)
   into a bundle with the real export code;
2. split the Fashion-MNIST images the pretraining never saw over the clients: the strongest label
   skew (one class per client) AND a different colour cast per client, each with a balanced
   held-out set in its own cast, written as ImageFolder trees;
3. start `fedprompt aggregator serve` and one `fedprompt client run` per client as separate
   processes on loopback, with client-level local DP, and print each committed round;
4. compare the final global prompt with zero-shot (hand prompt), the untrained initial prompt and
   local-only training (each client alone, same settings, without DP and with the same DP), all
   computed with the same client code.

The demo's process computes every client's image features once (with the client's own code, into
the client's state folder) before the clients start; the client processes then find them cached.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tqdm import tqdm

from aggregator.store import SQLiteStore, StoreError
from edge_client.bundle import Bundle, sha256_file
from edge_client.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from edge_client.prompts import initial_context
from edge_client.training import PromptObjective, accuracy
from edge_client.workspace import ClientWorkspace
from export.exporter import DEFAULT_OPSET, export_bundle
from export.pretrain import TINY_MODEL, WEIGHTS_DIR
from fedprompt.common.privacy import CLIENT_LEVEL_SENSITIVITY, PrivacyAccountant
from fedprompt.common.privacy_labels import describe_epsilon
from fedprompt.common.settings import TrainingSettings
from fedprompt.harness.baselines import local_only_rounds, zero_shot_accuracy
from fedprompt.harness.processes import Aggregator, ChildProcess, issue_tokens
from fedprompt.harness.splits import SplitSettings, make_splits, materialise_clients


@dataclass(frozen=True)
class DemoSettings:
    """Everything that shapes a demo run; written into its JSON."""

    split: SplitSettings
    training: TrainingSettings
    rounds: int
    round_timeout_s: float = 120.0
    run_timeout_s: float = 900.0


# Colour casts: the pretraining saw grayscale only, so zero-shot drops, yet one shared prompt can
# compensate a cast (measured; a 25 degree rotation or low contrast + noise could not be fixed by a
# shared text prompt here, so they stay available to the experiment harness but not the demo).
DEMO_DOMAINS = ("tint-orange", "tint-red", "tint-yellow", "tint-cyan")
# Client-level DP adds noise of norm ~ sigma * clip * sqrt(n_ctx * width) to each upload, while the
# clipped signal is at most `clip`; the mean over N clients keeps 1/sqrt(N) of the noise. Hence one
# context token (64 values; with 16 tokens an UNTRAINED random prompt already scored 0.40-0.50, so
# margins were noise), clip 0.2 (local updates at lr 0.002 have norm 0.6-1.5, so every client's
# update is clipped and counts alike) and noise multiplier 1.5: epsilon 34.6 at delta 1e-5 after 15
# rounds (replace-one adjacency, opacus PRV; RDP would say 36.7). With one token the split decides
# whether federation can clearly beat training alone;
# `fedprompt experiment --config fedprompt/harness/experiments/demo-{dirichlet,one-class}.toml`
# repeats this setting over 3 seeds (two runs of each, mean served accuracy vs local-only):
# - Dirichlet(0.1) label skew: local-only 0.447, PromptFL without DP 0.535, with this DP 0.485 and
#   0.530: +3.8 and +8.3 points, and single demo runs gave +2.1 to +7.3; not a robust margin
#   (server_lr < 1, a decaying server step, iterate averaging and a public 8/16-dim prompt
#   subspace, tried in-process, did not make it one);
# - one class per client (McMahan et al.'s pathological split at its extreme: a device that sees a
#   single kind of item): local-only 0.334, with this DP 0.468 and 0.504: +13.4 and +17.0.
# The demo uses the latter.
FULL = DemoSettings(
    split=SplitSettings(
        num_clients=16,
        scheme="pathological",
        classes_per_client=1,
        shifts=DEMO_DOMAINS,
        max_train_per_client=200,
        eval_per_class=50,
        seed=0,
    ),
    training=TrainingSettings(
        n_ctx=1,
        lr=0.002,
        local_epochs=2,
        batch_size=32,
        dp="client",
        clip=0.2,
        noise_multiplier=1.5,
        delta=1e-5,
    ),
    rounds=15,
)
QUICK = replace(
    FULL,
    split=replace(FULL.split, num_clients=4, max_train_per_client=60, eval_per_class=5),
    training=replace(FULL.training, local_epochs=1),
    rounds=2,
    run_timeout_s=300.0,
)


def committed_weights() -> Path:
    """The tiny CLIP's weights, checked against the sha256 in their provenance file."""
    weights = WEIGHTS_DIR / f"{TINY_MODEL}.safetensors"
    provenance = json.loads((WEIGHTS_DIR / f"{TINY_MODEL}.json").read_text())
    if not weights.is_file():
        raise click.ClickException(f"{weights} is missing; make it with `fedprompt pretrain`")
    if sha256_file(weights) != provenance["sha256"]:
        raise click.ClickException(f"{weights} does not match the sha256 recorded in its provenance file")
    return weights


def pretraining_images() -> int:
    """How many train-split images (the first N) the weights were pretrained on."""
    return int(json.loads((WEIGHTS_DIR / f"{TINY_MODEL}.json").read_text())["settings"]["train_images"])


def toml_table(name: str, values: dict[str, Any]) -> str:
    """One TOML table of scalars (None means: leave the documented default)."""
    lines = [f"[{name}]"]
    for key, value in values.items():
        if value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def write_aggregator_config(path: Path, settings: DemoSettings, bundle: Path) -> Path:
    """A loopback aggregator for the demo's bundle that waits for every client and samples all of
    them each round."""
    clients = settings.split.num_clients
    rounds = {
        "rounds": settings.rounds,
        "min_clients": clients,
        "fraction": 1.0,
        "min_fit": clients,
        "min_updates": clients,
        "round_timeout_s": settings.round_timeout_s,
        "poll_interval_s": 0.2,
        "heartbeat_interval_s": 2.0,
        "client_timeout_s": 60.0,
    }
    server = {"host": "127.0.0.1", "port": 0, "state": "aggregator.sqlite"}
    text = (
        toml_table("server", server)
        + toml_table("rounds", rounds)
        + toml_table("method", {"name": "promptfl", "bundle": str(bundle / "manifest.json")})
        + toml_table("training", settings.training.to_dict())
    )
    path.write_text(text)
    return path


@dataclass
class ClientData:
    """One demo client: its folders, its domain, its label histogram and its loaded workspace."""

    name: str
    train_dir: Path
    eval_dir: Path
    state_dir: Path
    shift: str
    label_counts: list[int]
    workspace: ClientWorkspace | None = None


def prepare_clients(workdir: Path, bundle: Path, split: SplitSettings) -> list[ClientData]:
    """Split the unseen Fashion-MNIST images, write each client's trees, and cache its features."""
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    pool = train.subset(np.arange(pretraining_images(), len(train)))  # never seen by the pretraining
    splits = make_splits(pool.labels, test.labels, split)
    folders = materialise_clients(workdir / "data", pool, test, splits, seed=split.seed)
    clients = []
    for item, (train_dir, eval_dir) in zip(splits, folders, strict=True):
        counts = np.bincount(pool.labels[item.train_indices], minlength=len(pool.class_names)).tolist()
        name = f"client-{item.client}"
        state = workdir / "clients" / name
        clients.append(ClientData(name, train_dir, eval_dir, state, item.shift, counts))
    for client in tqdm(clients, desc="caching image features", unit="client"):
        client.workspace = ClientWorkspace.load(
            bundle, client.train_dir, client.eval_dir, client.state_dir, progress=False
        )
    return clients


def held_out_accuracies(ctx: np.ndarray, clients: Sequence[ClientData]) -> list[float]:
    """Accuracy of one prompt on every client's balanced held-out set in its own domain."""
    results = []
    for client in clients:
        ws = client.workspace
        encode = ws.text_encoder(ctx.shape[0])
        objective = PromptObjective.coop(encode, ws.logit_scale)
        images, labels = ws.evaluation.tensors()
        prompt = {"ctx": torch.from_numpy(ctx.astype(np.float32))}
        results.append(accuracy(objective, prompt, (images,), labels))
    return results


ROUND_HEADER = (
    f"{'round':>5}  {'clients':>7}  {'local acc':>9}  {'held-out acc':>12}  "
    f"{'up B/client':>11}  {'down B/client':>13}  {'epsilon':>8}"
)


def round_summary(record: Any, clients: Sequence[ClientData], store: SQLiteStore) -> dict[str, Any]:
    """One committed round as the demo reports it, with the global prompt scored on held-out sets."""
    metrics = record.metrics
    held_out = held_out_accuracies(store.global_tensors(record.round_id)["ctx"], clients)
    return {
        "round": record.round_id,
        "clients": metrics["clients"],
        "mean_local_accuracy": metrics["client_metrics"].get("accuracy"),
        "held_out_accuracy": float(np.mean(held_out)),
        "held_out_accuracy_per_client": held_out,
        "bytes_up_per_client": metrics["bytes_up_per_client"],
        "bytes_down_per_client": metrics["bytes_down_per_client"],
        "epsilon": metrics["epsilon_max"],
        "delta": metrics["delta"],
    }


def format_round(summary: dict[str, Any], num_clients: int) -> str:
    local = summary["mean_local_accuracy"]
    epsilon = summary["epsilon"]
    return (
        f"{summary['round']:>5}  {len(summary['clients']):>3}/{num_clients:<3}  "
        f"{'-' if local is None else f'{local:.3f}':>9}  {summary['held_out_accuracy']:>12.3f}  "
        f"{summary['bytes_up_per_client']:>11.0f}  {summary['bytes_down_per_client']:>13.0f}  "
        f"{'-' if epsilon is None else f'{epsilon:.2f}':>8}"
    )


def privacy_floor(training: TrainingSettings) -> list[str]:
    """The demo devices' privacy policy, passed explicitly: exactly the DP the demo runs."""
    floor = ["--dp-mode", training.dp, "--min-noise-multiplier", str(training.noise_multiplier)]
    return [*floor, "--max-clip", str(training.clip), "--max-delta", str(training.delta)]


def run_federation(
    workdir: Path, bundle: Path, clients: Sequence[ClientData], settings: DemoSettings
) -> list[dict]:
    """Aggregator and clients as separate processes; prints each round as it is committed."""
    config = write_aggregator_config(workdir / "aggregator.toml", settings, bundle)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    tokens = issue_tokens(config, len(clients), logs / "tokens.log")
    aggregator = Aggregator(config, logs / "aggregator.log")
    processes: list[ChildProcess] = [aggregator]
    try:
        port = aggregator.wait_for_port()
        click.echo(f"aggregator listening on 127.0.0.1:{port} (log: {aggregator.log})")
        for client, token in zip(clients, tokens, strict=True):
            args = [
                "client", "run", "--aggregator", f"127.0.0.1:{port}", "--bundle", str(bundle),
                "--data", str(client.train_dir), "--eval-data", str(client.eval_dir), "--token", token,
                "--state-dir", str(client.state_dir), "--name", client.name, "--connect-timeout", "60",
                *privacy_floor(settings.training),
            ]  # fmt: skip
            processes.append(ChildProcess(client.name, args, logs / f"{client.name}.log"))
        click.echo(f"started {len(clients)} client processes (logs in {logs})")
        click.echo(ROUND_HEADER)
        return follow_rounds(workdir / "aggregator.sqlite", processes, clients, settings)
    finally:
        for process in processes:
            process.stop()


def follow_rounds(
    state: Path, processes: Sequence[ChildProcess], clients: Sequence[ClientData], settings: DemoSettings
) -> list[dict]:
    """Poll the aggregator's SQLite state until the last round is committed and every client has
    exited; any process failing stops the demo with its one-line error."""
    summaries: list[dict] = []
    end = time.monotonic() + settings.run_timeout_s
    client_processes = processes[1:]
    while len(summaries) < settings.rounds or any(p.proc.poll() is None for p in client_processes):
        for process in processes:
            problem = process.failed()
            if problem:
                raise click.ClickException(problem)
        if time.monotonic() > end:
            raise click.ClickException(f"the federated run took longer than {settings.run_timeout_s:.0f} s")
        if len(summaries) < settings.rounds and state.exists():
            try:
                store = SQLiteStore(state, read_only=True)
                records = store.rounds()
                for record in records[len(summaries) :]:
                    summaries.append(round_summary(record, clients, store))
                    click.echo(format_round(summaries[-1], len(clients)))
                store.close()
            except StoreError:
                pass  # the daemon is still creating its tables
        time.sleep(0.5)
    return summaries


def local_only_accuracies(
    clients: Sequence[ClientData], settings: DemoSettings, workdir: Path, dp: str
) -> list[float]:
    """Each client trains alone for the same rounds with the same settings, from its own state
    folder (its own accountant), on the features already cached; `dp` is the settings' DP mode
    ("none": nothing leaves the device, so a client alone needs no noise) or the same DP."""
    alone = []
    for client in clients:
        ws = client.workspace
        state = workdir / f"local-only-dp-{dp}" / client.name
        alone.append(ClientWorkspace(ws.bundle, ws.tower, ws.class_names, ws.train, ws.evaluation, state))
    final: list = []
    for results in local_only_rounds(alone, replace(settings.training, dp=dp), settings.rounds):
        final = results
    return [result.metrics["accuracy"] for result in final]


def rdp_epsilon(training: TrainingSettings, rounds: int) -> float:
    """What opacus' looser RDP accountant would say for the same mechanism (shown for comparison):
    Gaussian with multiplier sigma / sensitivity factor, sample rate 1, one step per round."""
    history = [(training.noise_multiplier / CLIENT_LEVEL_SENSITIVITY, 1.0, rounds)]
    return PrivacyAccountant("rdp", history).epsilon(training.delta)


def run_demo(settings: DemoSettings, workdir: Path) -> dict[str, Any]:
    """The whole demo in `workdir`; returns the JSON report."""
    started = time.monotonic()
    weights = committed_weights()
    click.echo(f"[1/5] exporting {TINY_MODEL} ({weights.name}) to an ONNX bundle")
    bundle = export_bundle(TINY_MODEL, str(weights), workdir / "bundle", ("fp32",), DEFAULT_OPSET)
    click.echo(f"[2/5] splitting Fashion-MNIST over {settings.split.num_clients} clients")
    clients = prepare_clients(workdir, bundle, settings.split)
    for client in clients:
        counts = ", ".join(
            f"{n} {c}" for n, c in zip(FASHION_MNIST_CLASSES, client.label_counts, strict=True) if c
        )
        click.echo(f"  {client.name}: domain {client.shift:<12} train images per class: {counts}")
    click.echo(
        f"[3/5] federated PromptFL, {settings.rounds} rounds, client-level local DP "
        f"(clip {settings.training.clip}, noise multiplier {settings.training.noise_multiplier})"
    )
    rounds = run_federation(workdir, bundle, clients, settings)
    click.echo("[4/5] baselines: zero-shot, untrained prompt, local-only without and with the same DP")
    zero_shot = [zero_shot_accuracy(client.workspace) for client in clients]
    training = settings.training
    untrained = held_out_accuracies(
        initial_context(
            training.n_ctx, clients[0].workspace.text_width, training.ctx_init_std, training.seed
        ).numpy(),
        clients,
    )
    local_only = local_only_accuracies(clients, settings, workdir, "none")
    local_only_dp = local_only_accuracies(clients, settings, workdir, training.dp)
    final = rounds[-1]["held_out_accuracy_per_client"]
    epsilon, delta = rounds[-1]["epsilon"], rounds[-1]["delta"]
    report = {
        "zero_shot_accuracy": float(np.mean(zero_shot)),
        # without DP: nothing leaves the device, so a client alone needs no noise (same-DP figure below)
        "local_only_accuracy": float(np.mean(local_only)),
        "local_only_accuracy_same_dp": float(np.mean(local_only_dp)),
        # the shared seeded prompt the federation starts from, untrained: what noise alone would keep
        "initial_prompt_accuracy": float(np.mean(untrained)),
        "final_accuracy": float(np.mean(final)),
        # DP noise makes the global prompt's accuracy move from round to round: report a steadier view too
        "final_accuracy_mean_last_3_rounds": float(np.mean([r["held_out_accuracy"] for r in rounds[-3:]])),
        "rounds": len(rounds),
        "epsilon": epsilon,
        "delta": delta,
        "accountant": settings.training.accountant,
        "adjacency": "replace-one (client-level)",
        "epsilon_rdp": rdp_epsilon(settings.training, len(rounds)),
        "bytes_up_per_client_round": max(r["bytes_up_per_client"] for r in rounds),
        "bytes_down_per_client_round": max(r["bytes_down_per_client"] for r in rounds),
        "per_round": rounds,
        "per_client": [
            {
                "client": c.name,
                "domain": c.shift,
                "train_label_counts": c.label_counts,
                "zero_shot": z,
                "local_only": lo,
                "local_only_same_dp": lod,
                "federated": f,
            }
            for c, z, lo, lod, f in zip(clients, zero_shot, local_only, local_only_dp, final, strict=True)
        ],
        "settings": {
            "split": asdict(settings.split),
            "training": settings.training.to_dict(),
            "rounds": settings.rounds,
        },
        "bundle_sha256": Bundle.open(bundle).digest,
        "weights_sha256": sha256_file(weights),
        "seconds": round(time.monotonic() - started, 1),
    }
    click.echo("[5/5] results (mean over clients, each on its balanced held-out set in its own domain)")
    for client in report["per_client"]:
        click.echo(
            f"  {client['client']} ({client['domain']}): zero-shot {client['zero_shot']:.3f}  "
            f"local-only {client['local_only']:.3f} (with DP {client['local_only_same_dp']:.3f})  "
            f"federated {client['federated']:.3f}"
        )
    click.echo(
        f"  zero-shot {report['zero_shot_accuracy']:.3f} | untrained prompt "
        f"{report['initial_prompt_accuracy']:.3f} | local-only {report['local_only_accuracy']:.3f} "
        f"(with the same DP {report['local_only_accuracy_same_dp']:.3f}) | federated "
        f"{report['final_accuracy']:.3f} after {report['rounds']} rounds (mean of the last 3: "
        f"{report['final_accuracy_mean_last_3_rounds']:.3f})"
    )
    guarantee = describe_epsilon(epsilon, delta, training.dp, training.accountant)
    click.echo(
        f"  privacy: local DP per client, {guarantee} "
        f"(opacus RDP would say {report['epsilon_rdp']:.2f}); "
        f"up {report['bytes_up_per_client_round']:.0f} B per client per round; {report['seconds']:.0f} s"
    )
    return report


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise click.Abort()


@click.command("demo")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the results (accuracies, epsilon, bytes, per round and per client) here.",
)
@click.option(
    "--quick",
    is_flag=True,
    help=f"A smoke run: {QUICK.split.num_clients} clients, {QUICK.rounds} rounds, a few images each.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the bundle, client data, logs and aggregator state here (default: a temporary "
    "folder, removed afterwards).",
)
def demo(json_path: Path | None, quick: bool, workdir: Path | None) -> None:
    """Run federated prompt learning end to end on the embedded default, offline.

    Exports the project's tiny CLIP (pretrained here on clean Fashion-MNIST), splits unseen
    Fashion-MNIST images over clients (one class each) with a different colour cast each, runs the
    real aggregator and client commands as separate processes on loopback with client-level local
    DP, and compares the final prompt with zero-shot and local-only training.
    """
    settings = QUICK if quick else FULL
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # so that `finally` stops the child processes
    temporary = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fedprompt-demo-")) if temporary else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run_demo(settings, workdir)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
