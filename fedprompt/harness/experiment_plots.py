"""The experiment's figure: accuracy per round for every method and, where some method runs with
DP, accuracy against the epsilon spent so far. Means over seeds, shaded ± one std."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from fedprompt.harness.experiment_config import ZERO_SHOT


def _by_round(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds, and the mean and std over seeds of `key` at each round."""
    rounds = sorted({r["round"] for r in rows if r[key] is not None})
    values = [[r[key] for r in rows if r["round"] == n and r[key] is not None] for n in rounds]
    return np.array(rounds), np.array([np.mean(v) for v in values]), np.array([np.std(v) for v in values])


def plot_experiment(rows: Sequence[dict[str, Any]], labels: Sequence[str], title: str, path: Path) -> Path:
    """Write the PNG; returns its path."""
    private = [m for m in labels if any(r["method"] == m and r["epsilon"] is not None for r in rows)]
    panels = 2 if private else 1
    figure, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.0), squeeze=False)
    per_round, colours = axes[0][0], plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: colours[i % len(colours)] for i, label in enumerate(labels)}
    last_round = max(r["round"] for r in rows)
    for label in labels:
        own = [r for r in rows if r["method"] == label]
        rounds, mean, std = _by_round(own, "accuracy")
        if label == ZERO_SHOT:
            per_round.axhline(mean[0], color=colour[label], linestyle="--", label=label)
            continue
        per_round.plot(rounds, mean, marker="o", markersize=3, color=colour[label], label=label)
        per_round.fill_between(rounds, mean - std, mean + std, color=colour[label], alpha=0.1)
    per_round.set(
        xlabel="round", ylabel="held-out accuracy (mean over clients)", title=f"{title}: accuracy per round"
    )
    per_round.set_xlim(0.5, max(last_round, 1) + 0.5)
    per_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    per_round.grid(alpha=0.3)
    if private:
        against = axes[0][1]
        for label in private:
            own = [r for r in rows if r["method"] == label]
            _, epsilon, _ = _by_round(own, "epsilon")
            _, mean, std = _by_round(own, "accuracy")
            against.errorbar(
                epsilon, mean, yerr=std, marker="o", markersize=3, capsize=2, color=colour[label], label=label
            )
        against.set(xlabel="ε spent so far (max over clients, mean over seeds)", ylabel="held-out accuracy")
        against.set_title(f"{title}: accuracy against privacy spent")
        against.grid(alpha=0.3)
    handles, names = per_round.get_legend_handles_labels()  # one legend for both panels, below them
    columns = min(len(names), 4)
    figure.legend(handles, names, loc="lower center", ncol=columns, fontsize=9, frameon=False)
    figure.tight_layout(rect=(0, 0.04 + 0.05 * ((len(names) + columns - 1) // columns), 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
