"""What an experiment writes: per-round metrics as CSV and JSON, and a markdown table of final
accuracies with each configured paper claim next to what was measured.

Claims are judged on paired differences: all methods of a seed share the split, so each seed gives
one difference, and the verdict says whether its mean is positive and whether every seed agrees.
A claim that does not hold here is reported as such.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.bundle import Bundle
from fedprompt.common.privacy_labels import short_label
from fedprompt.harness.experiment import ExperimentResults
from fedprompt.harness.experiment_config import CLAIM_METRICS, ZERO_SHOT, Claim
from fedprompt.harness.round_metrics import COLUMNS


def write_metrics(results: ExperimentResults, out_dir: Path) -> tuple[Path, Path]:
    """metrics.csv (one row per method, seed and round) and metrics.json (the same rows plus the
    splits, the runs with their noise calibration, the bundle and the timing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "metrics.csv", out_dir / "metrics.json"
    with open(csv_path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(results.rows)
    bundle = Bundle.open(results.bundle)
    document = {
        "experiment": results.config.name,
        "seeds": list(results.config.seeds),
        "bundle": {"path": str(results.bundle), "model": bundle.manifest["model"], "digest": bundle.digest},
        "splits": {str(seed): split for seed, split in results.splits.items()},
        "runs": [asdict(run) for run in results.runs],
        "rows": results.rows,
        "audit": [row.as_dict() for row in results.audit],
        "seconds": results.seconds,
    }
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    return csv_path, json_path


def final_rows(rows: Sequence[dict[str, Any]], method: str) -> dict[int, dict[str, Any]]:
    """The last round's row of `method` for every seed."""
    finals: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row["method"] == method and (
            row["seed"] not in finals or row["round"] > finals[row["seed"]]["round"]
        ):
            finals[row["seed"]] = row
    return finals


def _spread(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def _kilobytes(value: float | None) -> str:
    return "–" if value is None else f"{value / 1024:.1f} KB"


def _method_line(results: ExperimentResults, label: str) -> str:
    finals = final_rows(results.rows, label)
    rows = [r for r in results.rows if r["method"] == label]
    accuracy = [r["accuracy"] for r in finals.values() if r["accuracy"] is not None]
    served = [r["served_accuracy"] for r in finals.values() if r["served_accuracy"] is not None]
    central = [r["server_epsilon"] for r in finals.values() if r["server_epsilon"] is not None]
    epsilons = [r["epsilon"] for r in finals.values() if r["epsilon"] is not None]
    noise = [r["noise_multiplier"] for r in finals.values() if r["noise_multiplier"] is not None]
    privacy = "–"
    if epsilons:
        delta = max(r["delta"] for r in finals.values() if r["delta"] is not None)
        settings = next(e.settings.core for e in results.config.methods if e.label == label)
        named = short_label(settings.dp, settings.accountant)
        privacy = f"{_spread(epsilons, 2)} (δ {delta:g}, σ {_spread(noise, 2)}; {named})"
    if central:
        settings = next(e.settings.core for e in results.config.methods if e.label == label)
        privacy += f"; server ε {_spread(central, 2)} ({short_label('global', settings.accountant)})"
    traffic = "–"
    if label != ZERO_SHOT and any(r["bytes_up"] for r in rows):
        up = float(np.mean([r["bytes_up"] for r in rows]))
        down = float(np.mean([r["bytes_down"] for r in rows if r["round"] > 1] or [0.0]))
        traffic = f"{_kilobytes(up)} / {_kilobytes(down)}"
    seconds = [run.seconds for run in results.runs if run.method == label]
    ari = [r["ari"] for r in finals.values() if r["ari"] is not None]
    name = f"{label} (ARI {_spread(ari, 2)})" if ari else label
    cells = [name, _spread(accuracy), _spread(served), privacy, traffic, f"{np.mean(seconds):.1f} s"]
    return "| " + " | ".join(cells) + " |"


def _final_accuracy(results: ExperimentResults, label: str, metric: str) -> dict[int, float]:
    """Per seed, the final `metric` ("trained" or "served") of `label`, where it was measured."""
    column = CLAIM_METRICS[metric]
    finals = final_rows(results.rows, label).items()
    return {seed: row[column] for seed, row in finals if row[column] is not None}


def _verdict(holds: bool, per_seed: list[bool]) -> str:
    """'yes'/'no' from the mean over seeds, with how many seeds agree; 'inconclusive' when no more
    than half of them do."""
    verdict = "yes" if holds else "no"
    if len(per_seed) < 2:
        return verdict
    agree = sum(p == holds for p in per_seed)
    if 2 * agree <= len(per_seed):
        return f"inconclusive ({verdict} on the mean, {agree}/{len(per_seed)} seeds agree)"
    return f"{verdict} ({agree}/{len(per_seed)} seeds agree)"


def _signed(values: list[float]) -> str:
    return f"{np.mean(values):+.3f}" if values else "n/a"


def judge_claim(results: ExperimentResults, claim: Claim) -> tuple[str, str]:
    """(what was measured, whether the claim holds here) for one claim, from per-seed differences
    of final accuracies (paired: a seed's methods share one split)."""
    accuracy = {label: _final_accuracy(results, label, claim.subject_metric) for label in claim.subject}
    accuracy |= {label: _final_accuracy(results, label, claim.reference_metric) for label in claim.reference}
    seeds = sorted(set.intersection(*(set(a) for a in accuracy.values())))
    if not seeds:
        return "not measured", "n/a"
    if claim.test == "beats":
        subject = claim.subject[0]
        gaps = {r: [accuracy[subject][s] - accuracy[r][s] for s in seeds] for r in claim.reference}
        holds = all(np.mean(g) > 0 for g in gaps.values())
        per_seed = [all(g[i] > 0 for g in gaps.values()) for i in range(len(seeds))]
        others = ", ".join(
            f"{_spread([accuracy[r][s] for s in seeds])} {r} ({_signed(g)})" for r, g in gaps.items()
        )
        return f"{_spread([accuracy[subject][s] for s in seeds])} {subject} vs {others}", _verdict(
            holds, per_seed
        )
    (plain, private), (ref_plain, ref_private) = claim.subject, claim.reference
    drops = [accuracy[plain][s] - accuracy[private][s] for s in seeds]
    ref_drops = [accuracy[ref_plain][s] - accuracy[ref_private][s] for s in seeds]
    epsilon = {
        label: [r["epsilon"] for r in final_rows(results.rows, label).values() if r["epsilon"] is not None]
        for label in (private, ref_private)
    }
    measured = (
        f"accuracy drop {_spread(drops)} for {private} (ε {_spread(epsilon[private], 2)}) vs "
        f"{_spread(ref_drops)} for {ref_private} (ε {_spread(epsilon[ref_private], 2)})"
    )
    margins = [r - d for r, d in zip(ref_drops, drops, strict=True)]
    return measured, _verdict(float(np.mean(margins)) > 0, [m > 0 for m in margins])


def markdown_summary(results: ExperimentResults) -> str:
    """The results table and the claims table, in markdown."""
    config = results.config
    split = config.split
    scheme = (
        f"Dirichlet α={split.alpha:g}"
        if split.scheme == "dirichlet"
        else f"pathological, {split.classes_per_client} classes per client"
    )
    bundle = Bundle.open(results.bundle)
    ids = ", ".join(split_info["split_id"] for split_info in results.splits.values())
    lines = [
        f"### {config.name}",
        "",
        f"{split.num_clients} clients, {scheme}, domains {', '.join(split.shifts)}, "
        f"{split.evaluation} held-out sets; {config.rounds.rounds} rounds, "
        f"fraction {config.rounds.fraction:g}, tasks {config.rounds.task_encoding} and updates "
        f"{config.rounds.update_encoding} (unless an entry says); "
        f"seeds {', '.join(map(str, config.seeds))} (split ids {ids}); "
        f"bundle {bundle.manifest['model']} ({bundle.digest[:12]}). Accuracy on each client's held-out "
        f"set, clients weighted equally, mean ± std over seeds. Trained: each client's model after its "
        f"last round of local training (a personalised method's own model; PromptFL's local prompt before "
        f"averaging). Served: the model each client is served after the run (PromptFL: the final global "
        f"prompt; DP-FPL: it with the client's local prompt; pFedMoAP: it as local prompt with the "
        f"client's experts and gating network). Total {results.seconds / 60:.1f} min.",
        "",
        "| method | trained | served | ε (δ, noise σ) | up / down per client per round | time per run |",
        "| --- | --- | --- | --- | --- | --- |",
        *[_method_line(results, entry.label) for entry in config.methods],
    ]
    if split.base_classes or split.unseen_shift is not None:
        lines += ["", *_generalisation_table(results)]
    if config.claims:
        lines += ["", "| paper | claim | measured by fedprompt | holds here? |", "| --- | --- | --- | --- |"]
        for claim in config.claims:
            measured, verdict = judge_claim(results, claim)
            metrics = f"{claim.subject_metric} vs {claim.reference_metric}"
            lines.append(f"| {claim.paper} | {claim.claim} | {measured} ({metrics}) | {verdict} |")
    if results.audit:
        lines += ["", *audit_table(results)]
    return "\n".join(lines) + "\n"


GENERALISATION = {
    "served_base": "base",
    "served_new": "new",
    "served_hm": "H (base, new)",
    "served_unseen": "unseen domain",
}


def _generalisation_table(results: ExperimentResults) -> list[str]:
    """Served accuracy on base and new classes and their harmonic mean, and on the unseen domain."""
    split = results.config.split
    said = []
    if split.base_classes:
        said.append(
            f"clients trained on the first {split.base_classes} classes only; base and new accuracy each "
            "among their own classes, H their harmonic mean"
        )
    if split.unseen_shift is not None:
        said.append(f"unseen domain: held-out images in {split.unseen_shift}, a domain no client trained in")
    columns = [c for c in GENERALISATION if any(c in r and r[c] is not None for r in results.rows)]
    lines = [
        f"Generalisation, served models ({'; '.join(said)}):",
        "",
        "| method | " + " | ".join(GENERALISATION[c] for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for entry in results.config.methods:
        finals = final_rows(results.rows, entry.label).values()
        cells = [_spread([r[c] for r in finals if r.get(c) is not None]) for c in columns]
        lines.append(f"| {entry.label} | " + " | ".join(cells) + " |")
    return lines


def audit_table(results: ExperimentResults) -> list[str]:
    """The privacy audit's table (`fedprompt.harness.audit`): attacks and canaries per entry."""
    audit = results.config.audit
    confidence, fpr = f"{audit.confidence:.0%}", f"{audit.fpr:.0%}"
    lines = [
        f"Privacy audit (members: a seeded half of each client's images; TPR at {fpr} FPR; "
        f"canaries: {audit.trials} one-round trials of one device, {audit.canaries} mislabelled "
        f"examples in half of them; empirical ε: {confidence} Clopper-Pearson lower bound, held to "
        "the accounted ε of one round):",
        "",
        "| method | accounted ε of the run (one round) | attack on uploads: AUC / TPR | attack on the served "
        "prompt: AUC / TPR | empirical ε from canaries |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in results.audit:
        settings = results.config.entry(row.label).settings
        if row.epsilon_run is None:
            accounted = "∞ (no DP)"
        else:
            named = short_label(settings.dp, settings.accountant)
            accounted = f"{row.epsilon_run:.2f} ({row.epsilon_round:.2f}) at δ {row.delta:g}, {named}"
        lines.append(
            f"| {row.label} (seed {row.seed}) | {accounted} | {row.upload_auc:.3f} / {row.upload_tpr:.3f} | "
            f"{row.served_auc:.3f} / {row.served_tpr:.3f} | {row.empirical_epsilon:.2f} |"
        )
    return lines
