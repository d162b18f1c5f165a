"""A privacy audit of federated PromptFL: membership-inference attacks on what the server receives
and on the prompt the run serves, and an empirical lower bound on epsilon from inserted canaries,
printed next to the accountant's epsilon.

Members and non-members: each client's training images are split by a seeded coin; the client
trains on the members only, the others are non-members of the same class and domain. A score is
how much a prompt lowered an example's loss (difficulty calibration, Watson et al. 2022): for the
uploads, the loss under the prompt the client received minus the loss under the prompt it sent
back, averaged over its rounds (the server knows both); for the served prompt, the loss under the
shared starting prompt minus the loss under the final global prompt. Reported: ROC AUC and the TPR
at a low FPR (default 1%) of members against non-members, pooled over clients.

Canaries (Jagielski et al. 2020, Nasr et al. 2021): `trials` rounds of one device's real client
half, half of them with `canaries` mislabelled examples added to its data (chosen by a seeded
coin per trial), each from the final global prompt with fresh DP noise. The attacker scores the
upload by the canaries' loss drop; a threshold chosen on the first half of the trials is applied
to the second half, and Clopper-Pearson upper bounds on its false-positive and false-negative
rates give epsilon >= log((1 - delta - FPR) / FNR) (either direction) with the stated confidence.
A canary trial is one round of the mechanism, so the bound is compared with the accountant's
epsilon of ONE round (replace-one, the round's whole dataset changes); the whole run's epsilon is
shown beside it. An empirical epsilon above the accounted one is a defect: `AuditViolation`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import beta, rankdata

from aggregator.store import SQLiteStore
from edge_client.local_privacy import round_cost
from edge_client.methods.base import RoundTask
from edge_client.methods.registry import CLIENT_METHODS
from edge_client.prompts import initial_context
from edge_client.training import class_logits
from edge_client.workspace import ClientWorkspace, LabelledFeatures
from fedprompt.common.methods import RunSettings, TaskSettings
from fedprompt.common.privacy import PrivacyAccountant
from fedprompt.common.settings import TrainingSettings
from fedprompt.harness.experiment_config import AuditConfig
from fedprompt.harness.in_process import FederationRules, run_federated


class AuditViolation(RuntimeError):
    """The audit found more privacy loss than the accountant allows: a defect, not a result."""


def roc_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(member score > non-member score), ties counting half (Mann-Whitney U / (n m))."""
    ranks = rankdata(np.concatenate([members, non_members]))
    n, m = len(members), len(non_members)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float) -> float:
    """Share of members scored above the threshold that at most `fpr` of non-members exceed."""
    threshold = np.quantile(non_members, 1 - fpr, method="higher")
    return float(np.mean(members > threshold))


def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) upper confidence bound on a rate observed as errors / trials."""
    return 1.0 if errors >= trials else float(beta.ppf(1 - alpha, errors + 1, trials - errors))


def epsilon_lower_bound(
    scores_in: np.ndarray, scores_out: np.ndarray, delta: float, confidence: float
) -> float:
    """Epsilon any (epsilon, delta)-DP mechanism must have for a threshold test to separate trials
    with (`scores_in`) and without canaries this well, with probability >= `confidence`. The
    threshold is chosen on the first half of each and tested on the second half."""
    half_in, half_out = len(scores_in) // 2, len(scores_out) // 2
    choose_in, test_in = scores_in[:half_in], scores_in[half_in:]
    choose_out, test_out = scores_out[:half_out], scores_out[half_out:]
    alpha = (1 - confidence) / 2  # two rates bounded at once
    candidates = np.unique(np.concatenate([choose_in, choose_out]))
    best = max(candidates, key=lambda t: _bound(choose_in, choose_out, t, delta, alpha))
    return _bound(test_in, test_out, best, delta, alpha)


def _bound(
    scores_in: np.ndarray, scores_out: np.ndarray, threshold: float, delta: float, alpha: float
) -> float:
    false_negative = clopper_pearson_upper(int(np.sum(scores_in <= threshold)), len(scores_in), alpha)
    false_positive = clopper_pearson_upper(int(np.sum(scores_out > threshold)), len(scores_out), alpha)
    bounds = [0.0]
    for a, b in ((false_positive, false_negative), (false_negative, false_positive)):
        if b > 0 and 1 - delta - a > b:
            bounds.append(math.log((1 - delta - a) / b))
    return max(bounds)


@torch.no_grad()
def example_losses(ctx: np.ndarray, workspace: ClientWorkspace, data: LabelledFeatures) -> np.ndarray:
    """Each example's CoOp cross-entropy under the context `ctx`."""
    text = workspace.text_encoder(ctx.shape[0])(torch.from_numpy(np.asarray(ctx, np.float32)))
    logits = class_logits(data.features, text, workspace.logit_scale)
    return F.cross_entropy(logits, data.labels, reduction="none").numpy()


def member_split(data: LabelledFeatures, seed: int) -> tuple[LabelledFeatures, LabelledFeatures]:
    """(members, non-members): a seeded fair coin per example."""
    coin = np.random.default_rng(seed).random(len(data)) < 0.5
    members, others = torch.from_numpy(np.flatnonzero(coin)), torch.from_numpy(np.flatnonzero(~coin))
    return (
        LabelledFeatures(data.features[members], data.labels[members]),
        LabelledFeatures(data.features[others], data.labels[others]),
    )


@dataclass(frozen=True)
class AuditRow:
    label: str
    seed: int
    epsilon_run: float | None
    epsilon_round: float | None
    delta: float
    upload_auc: float
    upload_tpr: float
    served_auc: float
    served_tpr: float
    empirical_epsilon: float
    trials: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def audit_entry(
    label: str,
    settings: TrainingSettings,
    workspaces: Sequence[ClientWorkspace],
    rules: FederationRules,
    audit: AuditConfig,
    run_dir: Path,
) -> AuditRow:
    """Run the entry once on member-only clients, attack it, then run the canary trials."""
    seed = rules.seed
    splits = [member_split(ws.train, seed * 1_000 + i) for i, ws in enumerate(workspaces)]
    clients = [
        ClientWorkspace(ws.bundle, ws.tower, ws.class_names, members, ws.evaluation, run_dir / f"client-{i}")
        for i, (ws, (members, _)) in enumerate(zip(workspaces, splits, strict=True))
    ]
    for client in clients:
        client.state_dir.mkdir(parents=True)
    drops: list[list[np.ndarray]] = [[] for _ in clients]  # per client, per round: loss drop of every example

    start = initial_context(
        settings.n_ctx, clients[0].text_width, settings.ctx_init_std, settings.seed
    ).numpy()

    def on_upload(index: int, round_id: int, received: dict, sent: dict) -> None:
        ws, (members, others) = clients[index], splits[index]
        before = received.get("ctx", start)
        drops[index].append(
            np.concatenate(
                [
                    example_losses(before, ws, d) - example_losses(sent["ctx"], ws, d)
                    for d in (members, others)
                ]
            )
        )

    promptfl = RunSettings(TaskSettings("promptfl", settings))
    run = run_federated(promptfl, clients, rules, run_dir / "aggregator.sqlite", on_upload=on_upload)
    store = SQLiteStore(run_dir / "aggregator.sqlite", read_only=True)
    final = store.global_tensors()["ctx"]
    store.close()
    upload_in, upload_out, served_in, served_out = [], [], [], []
    for ws, (members, others), client_drops in zip(clients, splits, drops, strict=True):
        mean_drop = np.mean(client_drops, axis=0)
        upload_in.append(mean_drop[: len(members)])
        upload_out.append(mean_drop[len(members) :])
        served_in.append(example_losses(start, ws, members) - example_losses(final, ws, members))
        served_out.append(example_losses(start, ws, others) - example_losses(final, ws, others))
    upload_in, upload_out = np.concatenate(upload_in), np.concatenate(upload_out)
    served_in, served_out = np.concatenate(served_in), np.concatenate(served_out)
    epsilons = [c.privacy["epsilon"] for r in run.rounds for c in r.clients if "epsilon" in c.privacy]
    trials_in, trials_out = canary_trials(settings, clients[0], splits[0][1], final, audit, seed)
    cost = round_cost(settings, len(clients[0].train) + audit.canaries)
    one_round = None
    if cost is not None:
        one_round = PrivacyAccountant(
            settings.accountant, [(cost.noise_multiplier, cost.sample_rate, cost.steps)]
        )
    row = AuditRow(
        label=label,
        seed=seed,
        epsilon_run=max(epsilons) if epsilons else None,
        epsilon_round=one_round.epsilon(settings.delta) if one_round else None,
        delta=settings.delta,
        upload_auc=roc_auc(upload_in, upload_out),
        upload_tpr=tpr_at_fpr(upload_in, upload_out, audit.fpr),
        served_auc=roc_auc(served_in, served_out),
        served_tpr=tpr_at_fpr(served_in, served_out, audit.fpr),
        empirical_epsilon=epsilon_lower_bound(trials_in, trials_out, settings.delta, audit.confidence),
        trials=audit.trials,
    )
    if row.epsilon_round is not None and row.empirical_epsilon > row.epsilon_round:
        raise AuditViolation(
            f"{label}: the canary audit's empirical epsilon {row.empirical_epsilon:.3f} exceeds the "
            f"accounted {row.epsilon_round:.3f} of one round: a defect in the mechanism or its accounting"
        )
    return row


def canary_trials(
    settings: TrainingSettings,
    device: ClientWorkspace,
    spare: LabelledFeatures,
    received: np.ndarray,
    audit: AuditConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the trials with canaries and of those without (half each, in a seeded order)."""
    k = min(audit.canaries, len(spare))
    labels = (spare.labels[:k] + 1) % len(
        device.class_names
    )  # mislabelled: what training alone would not learn
    canaries = LabelledFeatures(spare.features[:k], labels)
    with_canaries = LabelledFeatures(
        torch.cat([device.train.features, canaries.features]),
        torch.cat([device.train.labels, canaries.labels]),
    )
    order = np.random.default_rng(seed + 7_919).permutation(np.arange(audit.trials) % 2 == 0)
    task_settings = TaskSettings("promptfl", replace(settings, epsilon_budget=None)).to_dict()
    scores: dict[bool, list[float]] = {True: [], False: []}
    base_loss = example_losses(received, device, canaries).sum()
    with tempfile.TemporaryDirectory(prefix="fedprompt-canaries-") as scratch:
        for trial, inserted in enumerate(order):
            state = Path(scratch) / f"trial-{trial}"
            state.mkdir()
            data = with_canaries if inserted else device.train
            ws = ClientWorkspace(
                device.bundle, device.tower, device.class_names, data, device.evaluation, state
            )
            task = RoundTask("audit", 1, "promptfl", task_settings, {"ctx": received}, deadline_unix=0.0)
            upload = CLIENT_METHODS["promptfl"](ws).run_round(task).tensors["ctx"]
            scores[bool(inserted)].append(float(base_loss - example_losses(upload, device, canaries).sum()))
    return np.asarray(scores[True]), np.asarray(scores[False])
