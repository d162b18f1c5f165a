"""Run an experiment: every configured method on the same clients, seed after seed.

For each seed the clients are split and featurised once; then each entry runs on fresh copies of
them (a new state folder per client and run, so accountants and local prompts never leak between
methods): zero-shot and local-only through `fedprompt.harness.baselines`, federated methods
through `fedprompt.harness.in_process` (the daemon's coordinator and the devices' client halves).
An entry with an epsilon target gets its noise multiplier from the accountant first.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from aggregator.store import ClientRoundRecord
from edge_client.torch_threads import torch_threads
from edge_client.workspace import ClientWorkspace
from fedprompt.common.methods import RunSettings
from fedprompt.common.settings import TrainingSettings
from fedprompt.harness.audit import AuditRow, audit_entry
from fedprompt.harness.baselines import local_only_rounds, zero_shot_accuracy
from fedprompt.harness.bundle_source import resolve_bundle
from fedprompt.harness.calibration import calibrate_noise_multiplier
from fedprompt.harness.client_data import SeedClients, fresh_workspace, load_pools, seed_clients
from fedprompt.harness.experiment_config import LOCAL_ONLY, ZERO_SHOT, ExperimentConfig, MethodEntry
from fedprompt.harness.generalisation import mean_scores, scores, served_classifier, zero_shot_classifier
from fedprompt.harness.in_process import FederationRules, run_federated
from fedprompt.harness.round_metrics import round_row


@dataclass
class RunSummary:
    """One (method, seed) run: how long it took and how its noise was chosen."""

    method: str
    seed: int
    seconds: float
    noise_multiplier: float | None
    calibration: dict[str, Any] | None = None


@dataclass
class ExperimentResults:
    """Everything the outputs are written from."""

    config: ExperimentConfig
    bundle: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    runs: list[RunSummary] = field(default_factory=list)
    splits: dict[int, dict[str, Any]] = field(default_factory=dict)
    audit: list[AuditRow] = field(default_factory=list)
    seconds: float = 0.0


def run_experiment(config: ExperimentConfig, out_dir: Path, progress: bool = True) -> ExperimentResults:
    """Run every entry of `config` for every seed; state of the runs goes to `out_dir/runs`. Torch
    uses `config.threads` threads meanwhile (small prompt steps run fastest on one thread, and
    oversubscribed threads on a busy machine slow them down many times over)."""
    with torch_threads(config.threads):
        return _run_all(config, out_dir, progress)


def _run_all(config: ExperimentConfig, out_dir: Path, progress: bool) -> ExperimentResults:
    started = time.perf_counter()
    cache = out_dir / "cache"
    results = ExperimentResults(config, resolve_bundle(config.bundle, config.base_dir, cache))
    pools = load_pools(config.data, config.base_dir)
    shutil.rmtree(out_dir / "runs", ignore_errors=True)
    units = sum(1 if e.method == ZERO_SHOT else config.rounds.rounds for e in config.methods)
    with tqdm(total=units * len(config.seeds), desc=config.name, unit="round", disable=not progress) as bar:
        for seed in config.seeds:
            bar.set_postfix_str(f"seed {seed}: featurising clients")
            clients = seed_clients(pools, config.split, seed, results.bundle, cache, config.bundle.precision)
            results.splits[seed] = _describe_split(clients)
            _run_seed(config, seed, clients, out_dir / "runs" / f"seed-{seed}", results, bar)
            if config.audit is not None:
                bar.set_postfix_str(f"seed {seed}: privacy audit")
                _audit_seed(config, seed, clients, out_dir / "runs" / f"seed-{seed}" / "audit", results)
    results.seconds = time.perf_counter() - started
    return results


def _run_seed(
    config: ExperimentConfig,
    seed: int,
    clients: SeedClients,
    seed_dir: Path,
    results: ExperimentResults,
    bar: tqdm,
) -> None:
    """Every entry on this seed's clients, an entry whose epsilon another matches first."""
    spent: dict[str, float] = {}  # label -> largest epsilon its clients reported
    for entry in config.run_order():
        bar.set_postfix_str(f"seed {seed}: {entry.label}")
        started = time.perf_counter()
        settings, calibration = _seeded_settings(entry, seed, clients, spent, config.rounds.rounds)
        noise = settings.core.noise_multiplier if settings.core.dp != "none" else None
        identity = {
            "experiment": config.name,
            "method": entry.label,
            "method_name": entry.method,
            "seed": seed,
            "split_id": clients.split_id,
            "noise_multiplier": noise,
        }
        run_dir = seed_dir / _slug(config.methods.index(entry), entry.label)
        rows = _run_entry(entry, settings, clients, config, run_dir, identity, lambda _: bar.update(1))
        results.rows += rows
        epsilons = [r["epsilon"] for r in rows if r["epsilon"] is not None]
        if epsilons:
            spent[entry.label] = max(epsilons)
        results.runs.append(RunSummary(entry.label, seed, time.perf_counter() - started, noise, calibration))


def _audit_seed(
    config: ExperimentConfig, seed: int, clients: SeedClients, audit_dir: Path, results: ExperimentResults
) -> None:
    """The privacy audit of every federated entry on this seed's clients (its own runs)."""
    spent: dict[str, float] = {}  # as in the comparison: what an epsilon-matching entry matches
    for row in results.rows:
        if row["seed"] == seed and row["epsilon"] is not None:
            spent[row["method"]] = max(spent.get(row["method"], 0.0), row["epsilon"])
    for index, entry in enumerate(config.methods):
        if entry.federated:
            settings, _ = _seeded_settings(entry, seed, clients, spent, config.rounds.rounds)
            run_dir = audit_dir / _slug(index, entry.label)
            row = audit_entry(
                entry.label, settings.core, clients.workspaces, _rules(config, seed), config.audit, run_dir
            )
            results.audit.append(row)


def _rules(config: ExperimentConfig, seed: int, entry: MethodEntry | None = None) -> FederationRules:
    """The daemon's rules of a run; an entry's own encodings override [rounds]'s."""
    return FederationRules(
        rounds=config.rounds.rounds,
        fraction=config.rounds.fraction,
        seed=seed,
        task_encoding=(entry and entry.task_encoding) or config.rounds.task_encoding,
        update_encoding=(entry and entry.update_encoding) or config.rounds.update_encoding,
    )


def _seeded_settings(
    entry: MethodEntry, seed: int, clients: SeedClients, spent: dict[str, float], rounds: int
) -> tuple[RunSettings, dict[str, Any] | None]:
    """The entry's settings for this seed, with the noise multiplier calibrated if it has a target."""
    settings = entry.settings.with_core(seed=seed)
    target = entry.target_epsilon
    if entry.match_epsilon_of is not None:
        if entry.match_epsilon_of not in spent:
            raise ValueError(f"{entry.label}: {entry.match_epsilon_of} reported no epsilon to match")
        target = spent[entry.match_epsilon_of]
    if target is None:
        return settings, None
    examples = [len(workspace.train) for workspace in clients.workspaces]
    noise = calibrate_noise_multiplier(settings.core, examples, rounds, target)
    calibration = {"target_epsilon": target, "matched": entry.match_epsilon_of, "rounds": rounds}
    return settings.with_core(noise_multiplier=noise), calibration


def _run_entry(
    entry: MethodEntry,
    settings: RunSettings,
    clients: SeedClients,
    config: ExperimentConfig,
    run_dir: Path,
    identity: dict[str, Any],
    on_round: Callable[[int], None],
) -> list[dict[str, Any]]:
    """Run one entry for one seed and return its rows (round 0 only for zero-shot); the last row
    also carries `served_accuracy`, the client mean of what each client is left with."""
    if entry.method == ZERO_SHOT:
        names = [f"client-{i}" for i in range(len(clients.workspaces))]
        records = [
            ClientRoundRecord(name, len(ws.train), {"accuracy": zero_shot_accuracy(ws)})
            for name, ws in zip(names, clients.workspaces, strict=True)
        ]
        on_round(0)
        rows = [round_row(records, dict(zip(names, clients.domains, strict=True)), {**identity, "round": 0})]
        rows[-1]["served_accuracy"] = rows[-1]["accuracy"]  # the hand prompt is all there is
        rows[-1].update(
            _generalisation(config, clients, [zero_shot_classifier(ws) for ws in clients.workspaces])
        )
        return rows
    workspaces = [fresh_workspace(ws, run_dir / f"client-{i}") for i, ws in enumerate(clients.workspaces)]
    if entry.method == LOCAL_ONLY:
        return _local_only_rows(workspaces, settings.core, config, clients.domains, identity, on_round)
    rules = _rules(config, identity["seed"], entry)
    run = run_federated(settings, workspaces, rules, run_dir / "aggregator.sqlite", on_round)
    domains = dict(zip(run.client_ids, clients.domains, strict=True))
    rows = [
        round_row(r.clients, domains, {**identity, "round": r.round_id}, r.metrics.get("strategy"))
        for r in run.rounds
    ]
    rows[-1]["served_accuracy"] = float(np.mean(run.served_accuracy))
    rows[-1].update(
        _generalisation(config, clients, [served_classifier(entry.method, ws) for ws in workspaces])
    )
    return rows


def _generalisation(config: ExperimentConfig, clients: SeedClients, classifiers: list) -> dict[str, float]:
    """Base-to-new and unseen-domain scores of the served classifiers, where the split asks for them."""
    split = config.split
    if not split.base_classes and split.unseen_shift is None:
        return {}
    unseen = clients.unseen or [None] * len(classifiers)
    per_client = [
        scores(classify, ws.evaluation, moved, split.base_classes)
        for classify, ws, moved in zip(classifiers, clients.workspaces, unseen, strict=True)
    ]
    return mean_scores(per_client)


def _local_only_rows(
    workspaces: list[ClientWorkspace],
    settings: TrainingSettings,
    config: ExperimentConfig,
    domains: list[str],
    identity: dict[str, Any],
    on_round: Callable[[int], None],
) -> list[dict[str, Any]]:
    """Rows of the local-only baseline. Nothing is received (a round starts from the client's own
    prompt), and what a client is left with is its own prompt after the last round."""
    names = [f"client-{i}" for i in range(len(workspaces))]
    rows = []
    for round_id, results in enumerate(local_only_rounds(workspaces, settings, config.rounds.rounds), 1):
        records = [
            ClientRoundRecord(name, r.num_examples, _without(r.metrics, "received_accuracy"), r.privacy)
            for name, r in zip(names, results, strict=True)
        ]
        rows.append(
            round_row(records, dict(zip(names, domains, strict=True)), {**identity, "round": round_id})
        )
        on_round(round_id)
    rows[-1]["served_accuracy"] = rows[-1]["accuracy"]
    return rows


def _without(metrics: dict[str, float], key: str) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if name != key}


def _describe_split(clients: SeedClients) -> dict[str, Any]:
    """What the split of a seed was, for the JSON: its id and each client's domain and sizes."""
    return {
        "split_id": clients.split_id,
        "clients": [
            {
                "client": split.client,
                "domain": split.shift,
                "train_examples": len(ws.train),
                "eval_examples": len(ws.evaluation),
                "train_class_counts": torch.bincount(ws.train.labels, minlength=len(ws.class_names)).tolist(),
            }
            for split, ws in zip(clients.splits, clients.workspaces, strict=True)
        ],
    }


def _slug(index: int, label: str) -> str:
    """A folder name for the entry at `index` of the config (labels may differ only in symbols)."""
    return f"{index:02d}-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in label.lower())
