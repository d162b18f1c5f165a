"""What one round of local DP costs, and the device's persistent accountant that pays for it.

A round's whole cost is recorded (and saved) BEFORE training starts, after checking it against the
epsilon budget: if the device crashes mid-round the spend stays counted (the safe side), and a
round the budget cannot afford is refused before any data is touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fedprompt.common.privacy import PrivacyAccountant, client_level_accounting
from fedprompt.common.settings import TrainingSettings

ACCOUNTANT_FILE = "privacy_accountant.json"


@dataclass(frozen=True)
class RoundCost:
    """Accountant parameters of one round: multiplier, sampling rate, number of compositions."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def round_cost(settings: TrainingSettings, num_examples: int) -> RoundCost | None:
    """The mechanism a round runs under `settings` (None without DP).

    client: the round's update, clipped to C, noised with std sigma*C; replacement adjacency gives
    multiplier sigma/2, rate 1, one step. sample: DP-SGD with q = batch / examples and
    local_epochs * ceil(examples / batch) Poisson steps, each with multiplier sigma.
    """
    if settings.dp == "client":
        return RoundCost(**client_level_accounting(settings.noise_multiplier))
    if settings.dp == "sample":
        sample_rate = min(1.0, settings.batch_size / num_examples)
        steps = settings.local_epochs * math.ceil(num_examples / settings.batch_size)
        return RoundCost(settings.noise_multiplier, sample_rate, steps)
    return None


class LocalAccountant:
    """The device's accountant, kept in `state_dir` across rounds and restarts."""

    def __init__(self, state_dir: Path, settings: TrainingSettings) -> None:
        self.path = Path(state_dir) / ACCOUNTANT_FILE
        self.settings = settings
        self.accountant = PrivacyAccountant.load(self.path, settings.accountant)

    def spend(self, cost: RoundCost) -> None:
        """Refuse (BudgetExceeded) or record and save the round's cost."""
        s = self.settings
        self.accountant.check_budget(
            s.epsilon_budget, s.delta, cost.noise_multiplier, cost.sample_rate, cost.steps
        )
        self.accountant.step(cost.noise_multiplier, cost.sample_rate, cost.steps)
        self.accountant.save(self.path)

    def report(self, cost: RoundCost | None) -> dict[str, float]:
        """The privacy fields sent with an update: epsilon spent so far and how it was computed."""
        if cost is None:
            return {}
        s = self.settings
        report = {
            "epsilon": self.accountant.epsilon(s.delta),
            "delta": s.delta,
            "noise_multiplier": s.noise_multiplier,
            "clip": s.clip,
            "accounted_noise_multiplier": cost.noise_multiplier,
            "sample_rate": cost.sample_rate,
            "steps": float(cost.steps),
            "total_steps": float(self.accountant.steps),
        }
        if s.epsilon_budget is not None:
            report["epsilon_budget"] = s.epsilon_budget
        return report
