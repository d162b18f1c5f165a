"""Gaussian mechanisms, L2 clipping and a persistent privacy accountant over opacus' analyses.

Every epsilon fedprompt prints comes from `PrivacyAccountant.epsilon`, which replays the recorded
(noise multiplier, sample rate, steps) history through opacus' own accountants, so the number
always matches the mechanism that was run. The default, "prv", is the tightest of them for every
mechanism fedprompt runs (the Gaussian mechanism, alone or Poisson-subsampled): opacus' PRV upper
bound (Gopi et al. 2021), or opacus' RDP bound where that is lower (tiny epsilons, where PRV's
absolute error dominates) or where PRV's grid would not fit in memory (very small noise). Both
are valid upper bounds, so their minimum is one. "rdp" alone stays available. Tests check every
mechanism against Google's `dp-accounting` PLD accountant. The history is JSON and is saved on disk
after every step, so a restarted device or server continues its epsilon instead of starting again.

Numpy only (plus opacus for the analysis), so the aggregator can use it for central DP too.
"""

from __future__ import annotations

import functools
import json
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

from fedprompt.common.files import write_atomically
from fedprompt.common.privacy_labels import ACCOUNTANT_KINDS

# PRV's absolute epsilon error: 0.5% of the RDP bound, within [1e-4, 1e-2] (opacus' default 1e-2
# alone would put a small epsilon tens of percent above the tight value).
PRV_RELATIVE_ERROR, PRV_ERROR_RANGE = 0.005, (1e-4, 1e-2)
PRV_MAX_GRID_POINTS = 4_000_000  # beyond this PRV's convolution grid costs gigabytes: use RDP
STATE_VERSION = 1
Entry = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as opacus records them

# Client-level DP with replacement adjacency: two local datasets can give updates up to 2C apart
# after clipping to C, so noise of std sigma*C is a Gaussian mechanism with multiplier sigma/2.
CLIENT_LEVEL_SENSITIVITY = 2.0


class BudgetExceeded(RuntimeError):
    """Taking the next step would spend more than the configured epsilon budget."""


class PrivacyStateError(RuntimeError):
    """A saved accountant state cannot be read; refusing beats silently restarting at epsilon 0."""


def secure_rng() -> np.random.Generator:
    """A generator seeded from the OS: DP noise must never follow a seed the server knows."""
    return np.random.default_rng(secrets.randbits(128))


def l2_norm(tensors: dict[str, np.ndarray]) -> float:
    """The L2 norm of all tensors taken together as one vector."""
    return float(np.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors.values())))


def clip_to_norm(tensors: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the tensors jointly so their L2 norm is at most `clip`; also return the norm before."""
    norm = l2_norm(tensors)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {name: (t * scale).astype(t.dtype) for name, t in tensors.items()}, norm


def add_gaussian_noise(
    tensors: dict[str, np.ndarray], std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Each entry plus independent N(0, std^2) noise (computed in float64, returned in its dtype)."""
    return {
        name: (t.astype(np.float64) + rng.normal(0.0, std, size=t.shape)).astype(t.dtype)
        for name, t in tensors.items()
    }


def client_level_mechanism(
    update: dict[str, np.ndarray], clip: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], float]:
    """Clip a round's update to `clip` and add N(0, (noise_multiplier*clip)^2) noise per entry.

    Returns the privatised update and the norm before clipping (a local metric only, never sent).
    Account for it with `client_level_accounting(noise_multiplier)`.
    """
    clipped, norm = clip_to_norm(update, clip)
    return add_gaussian_noise(clipped, noise_multiplier * clip, rng), norm


def client_level_accounting(noise_multiplier: float) -> dict[str, float]:
    """The accountant step of one client-level round: multiplier sigma/2, sample rate 1, one step."""
    return {"noise_multiplier": noise_multiplier / CLIENT_LEVEL_SENSITIVITY, "sample_rate": 1.0, "steps": 1}


def rdp_epsilon(history: list[Entry], delta: float) -> float:
    """Opacus' RDP bound for the history."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def prv_epsilon(history: list[Entry], delta: float, eps_error: float) -> float | None:
    """Opacus' PRV upper bound for the history, or None when its grid would be too large."""
    delta_error = delta / 1000  # opacus' default
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [n for _, _, n in history]
    half_width = compute_safe_domain_size(prvs, counts, eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / np.sqrt(sum(counts) * np.log(12 / delta_error) / 2)  # as opacus sets it
    if 2 * half_width / mesh > PRV_MAX_GRID_POINTS:
        return None
    accountant = PRVAccountant()
    accountant.history = list(history)
    with np.errstate(all="ignore"):  # log(0) at q = 1 and overflows, masked by opacus itself
        return float(accountant.get_epsilon(delta=delta, eps_error=eps_error, delta_error=delta_error))


@functools.lru_cache(maxsize=4096)
def tightest_epsilon(history: tuple[Entry, ...], delta: float) -> float:
    """min(PRV, RDP): the "prv" accountant's epsilon (see the module docstring). Cached: budget
    checks and noise calibration ask for the same histories again and again."""
    with warnings.catch_warnings():  # opacus warns about alpha ranges and overflows it handles
        warnings.simplefilter("ignore")
        rdp = rdp_epsilon(list(history), delta)
        eps_error = min(max(PRV_RELATIVE_ERROR * rdp, PRV_ERROR_RANGE[0]), PRV_ERROR_RANGE[1])
        prv = prv_epsilon(list(history), delta, eps_error)
    return rdp if prv is None else min(prv, rdp)


@dataclass
class PrivacyAccountant:
    """Composition of subsampled Gaussian mechanisms; `history` holds (sigma, q, steps) entries."""

    kind: str = "prv"
    history: list[Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ACCOUNTANT_KINDS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANT_KINDS)}, got {self.kind!r}")
        self.history = [(float(s), float(q), int(n)) for s, q, n in self.history]

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` runs of the Gaussian mechanism; equal consecutive entries are merged."""
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1 or steps < 1:
            raise ValueError("an accountant step needs noise_multiplier > 0, 0 < q <= 1, steps >= 1")
        self.history = self._extended(noise_multiplier, sample_rate, steps)

    def _extended(self, noise_multiplier: float, sample_rate: float, steps: int) -> list[Entry]:
        history = list(self.history)
        if history and history[-1][:2] == (float(noise_multiplier), float(sample_rate)):
            sigma, q, n = history.pop()
            history.append((sigma, q, n + steps))
        else:
            history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        return history

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta`, from opacus' accountant (0 before any step)."""
        return self._epsilon_of(self.history, delta)

    def epsilon_after(
        self, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> float:
        """Epsilon that would be spent after the given further steps, without recording them."""
        return self._epsilon_of(self._extended(noise_multiplier, sample_rate, steps), delta)

    def _epsilon_of(self, history: list[Entry], delta: float) -> float:
        if not history:
            return 0.0
        if self.kind == "rdp":
            return rdp_epsilon(history, delta)
        return tightest_epsilon(tuple(history), delta)

    def check_budget(
        self, budget: float | None, delta: float, noise_multiplier: float, sample_rate: float, steps: int = 1
    ) -> None:
        """Raise BudgetExceeded if the planned steps would take epsilon past `budget` (None = no limit)."""
        if budget is None:
            return
        planned = self.epsilon_after(delta, noise_multiplier, sample_rate, steps)
        if planned > budget:
            raise BudgetExceeded(
                f"privacy budget exhausted: epsilon spent {self.epsilon(delta):.3f}, this round would reach "
                f"{planned:.3f} > budget {budget:g} (delta={delta:g}); refusing to train"
            )

    def report(self, delta: float) -> dict[str, Any]:
        """Epsilon with everything needed to recompute it."""
        return {
            "epsilon": self.epsilon(delta),
            "delta": delta,
            "accountant": self.kind,
            "steps": self.steps,
            "history": [list(h) for h in self.history],
        }

    def to_json(self) -> str:
        return json.dumps({"version": STATE_VERSION, "kind": self.kind, "history": self.history})

    @classmethod
    def from_json(cls, text: str) -> PrivacyAccountant:
        try:
            state = json.loads(text)
            if state["version"] != STATE_VERSION:
                raise ValueError(f"version {state['version']}")
            return cls(kind=state["kind"], history=[tuple(h) for h in state["history"]])
        except (ValueError, KeyError, TypeError) as error:
            raise PrivacyStateError(f"unreadable privacy accountant state ({error})") from error

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old or the new state, never a reset one."""
        write_atomically(path, self.to_json().encode())

    @classmethod
    def load(cls, path: Path, kind: str) -> PrivacyAccountant:
        """The saved accountant, or a fresh one of `kind` if none was saved yet. A saved state of
        another kind is an error: switching accountants mid-way would misreport the spend."""
        path = Path(path)
        if not path.exists():
            return cls(kind=kind)
        try:
            accountant = cls.from_json(path.read_text())
        except PrivacyStateError as error:
            raise PrivacyStateError(f"{path}: {error}; fix or remove it knowingly") from error
        if accountant.kind != kind:
            raise PrivacyStateError(f"{path} holds a {accountant.kind} accountant, settings ask for {kind}")
        return accountant
