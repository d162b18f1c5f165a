"""The device owner's privacy floor: local DP exists to protect a device from the aggregator, so the
device, not the aggregator, decides the weakest DP it accepts.

`PrivacyPolicy` is the floor (a TOML file and/or `fedprompt client run` flags): the DP modes
allowed, the least noise, the largest clip and delta, the most epsilon per run and over the
device's life, and the accountant. `PolicyGuard` enforces it in the client's task path, once per
task and before any method code runs: it keeps the policy in the state folder (a later start with
a weaker one is refused unless the owner says so), pins a run's DP settings at the device's first
round of that run (a later task of the run that changes any is refused), and refuses a task below
the floor with one line naming the setting, the value asked and the floor. Nothing is trained,
spent or sent for a refused task.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from edge_client.local_privacy import ACCOUNTANT_FILE, round_cost
from fedprompt.common.files import write_atomically
from fedprompt.common.privacy import PrivacyAccountant
from fedprompt.common.privacy_labels import ACCOUNTANT_KINDS
from fedprompt.common.settings import DP_MODES, TrainingSettings

POLICY_FILE = "privacy-policy.json"
PINS_FILE = "privacy-pins.json"
# The settings that decide a round's privacy; pinned per run at the device's first round of it.
PINNED_SETTINGS = (
    "dp",
    "clip",
    "noise_multiplier",
    "delta",
    "accountant",
    "epsilon_budget",
    "batch_size",
    "local_epochs",
)


class PolicyError(ValueError):
    """A policy file or flag that cannot be used, or a weaker policy than the stored one; one line."""


class PolicyRefusal(Exception):
    """A task below the device's floor. `str()` is the one line the device prints and sends."""

    def __init__(self, setting: str, asked: Any, floor: str) -> None:
        self.setting, self.asked, self.floor = setting, asked, floor
        super().__init__(f"{setting} = {asked} asked, this device's floor: {floor}")


@dataclass(frozen=True)
class PrivacyPolicy:
    """The device's floor. None = no limit. The default refuses dp = "none" (`--allow-no-dp`)."""

    dp_modes: tuple[str, ...] = ("client", "sample")
    min_noise_multiplier: float = 0.5
    max_clip: float | None = None
    max_delta: float = 1e-5
    max_epsilon_per_run: float | None = None
    max_epsilon_lifetime: float | None = None
    accountant: str = "prv"

    def __post_init__(self) -> None:
        modes = tuple(self.dp_modes)
        object.__setattr__(self, "dp_modes", modes)
        if not modes or not set(modes) <= set(DP_MODES):
            raise PolicyError(
                f"dp_modes must be a non-empty list of {', '.join(DP_MODES)}, got {list(modes)}"
            )
        if self.accountant not in ACCOUNTANT_KINDS:
            raise PolicyError(
                f"accountant must be one of {', '.join(ACCOUNTANT_KINDS)}, got {self.accountant!r}"
            )
        for name in (
            "min_noise_multiplier",
            "max_clip",
            "max_delta",
            "max_epsilon_per_run",
            "max_epsilon_lifetime",
        ):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int | float) or not math.isfinite(value) or value < 0
            ):
                raise PolicyError(f"{name} must be a non-negative number, got {value!r}")
        if not 0 < self.max_delta < 1:
            raise PolicyError(f"max_delta must be in (0, 1), got {self.max_delta!r}")

    @classmethod
    def from_toml(cls, path: Path) -> PrivacyPolicy:
        """A policy file: the keys of this dataclass at top level; unknown keys are errors."""
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise PolicyError(f"privacy policy {path}: {error}") from None
        return cls.from_dict(values, str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "privacy policy") -> PrivacyPolicy:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PolicyError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except (TypeError, PolicyError) as error:
            raise PolicyError(f"{where}: {error}") from None

    def with_overrides(self, **overrides: Any) -> PrivacyPolicy:
        """This policy with the flags the owner passed (None = not passed)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def weaker_than(self, stored: PrivacyPolicy) -> list[str]:
        """Each way this policy accepts something `stored` refuses, one phrase each."""
        weaker = []
        if extra := sorted(set(self.dp_modes) - set(stored.dp_modes)):
            weaker.append(f"dp_modes adds {extra}")
        if self.min_noise_multiplier < stored.min_noise_multiplier:
            weaker.append(
                f"min_noise_multiplier {self.min_noise_multiplier:g} < {stored.min_noise_multiplier:g}"
            )
        for name in ("max_clip", "max_delta", "max_epsilon_per_run", "max_epsilon_lifetime"):
            mine, theirs = _limit(getattr(self, name)), _limit(getattr(stored, name))
            if mine > theirs:
                weaker.append(f"{name} {getattr(self, name)} > {getattr(stored, name)}")
        if self.accountant != stored.accountant:
            weaker.append(f"accountant {self.accountant} instead of {stored.accountant}")
        return weaker

    def check_settings(self, settings: TrainingSettings) -> None:
        """Raise PolicyRefusal for the first DP setting below the floor."""
        if settings.dp not in self.dp_modes:
            hint = " (the owner opts in with --allow-no-dp)" if settings.dp == "none" else ""
            raise PolicyRefusal("dp", f'"{settings.dp}"', f"one of {', '.join(self.dp_modes)}{hint}")
        if settings.dp == "none":
            return
        if settings.noise_multiplier < self.min_noise_multiplier:
            raise PolicyRefusal(
                "noise_multiplier", settings.noise_multiplier, f"at least {self.min_noise_multiplier:g}"
            )
        if self.max_clip is not None and settings.clip > self.max_clip:
            raise PolicyRefusal("clip", settings.clip, f"at most {self.max_clip:g}")
        if settings.delta > self.max_delta:
            raise PolicyRefusal("delta", settings.delta, f"at most {self.max_delta:g}")
        if settings.accountant != self.accountant:
            raise PolicyRefusal("accountant", f'"{settings.accountant}"', f'"{self.accountant}"')


def _limit(value: float | None) -> float:
    return math.inf if value is None else float(value)


def install_policy(state_dir: Path, policy: PrivacyPolicy, accept_weaker: bool = False) -> list[str]:
    """Keep `policy` as the device's floor in `state_dir`. The first start writes it; a later start
    with a weaker one raises PolicyError unless `accept_weaker` (then it replaces the stored one and
    the weakenings are returned, for the log). A stronger or equal one replaces it silently."""
    path = Path(state_dir) / POLICY_FILE
    weaker: list[str] = []
    if path.exists():
        try:
            stored = PrivacyPolicy.from_dict(json.loads(path.read_text()), str(path))
        except ValueError as error:
            raise PolicyError(f"{path} is unreadable ({error}); fix or remove it knowingly") from None
        weaker = policy.weaker_than(stored)
        if weaker and not accept_weaker:
            raise PolicyError(
                f"this privacy policy is weaker than the one this device keeps in {path} "
                f"({'; '.join(weaker)}); pass --accept-weaker-policy to replace it"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(asdict(policy), indent=1).encode())
    return weaker


class PolicyGuard:
    """The policy check of the client's task path: `admit(run, round, settings)` returns or raises
    PolicyRefusal, before any method code runs. An admitted task's DP settings are pinned for its
    run and its cost recorded against the run's epsilon (both saved in `state_dir`)."""

    def __init__(self, state_dir: Path, policy: PrivacyPolicy, num_examples: int) -> None:
        self.state_dir = Path(state_dir)
        self.policy = policy
        self.num_examples = num_examples
        self.path = self.state_dir / PINS_FILE
        self.runs: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def admit(self, run_id: str, round_id: int, settings: TrainingSettings) -> None:
        self.policy.check_settings(settings)
        asked = {name: getattr(settings, name) for name in PINNED_SETTINGS}
        run = self.runs.get(run_id)
        if run is not None:
            for name, pinned in run["pinned"].items():
                if asked[name] != pinned:
                    raise PolicyRefusal(
                        name, asked[name], f"{pinned} (pinned at round {run['round']} of this run)"
                    )
        cost = round_cost(settings, self.num_examples)
        history = [tuple(entry) for entry in (run or {}).get("history", [])]
        if cost is not None:
            entry = (cost.noise_multiplier, cost.sample_rate, cost.steps)
            self._check_epsilon(settings, history, entry)
            history.append(entry)
        self.runs[run_id] = {
            "round": (run or {}).get("round", round_id),
            "pinned": (run or {}).get("pinned", asked),
            "history": history,
        }
        write_atomically(self.path, json.dumps(self.runs).encode())

    def _check_epsilon(self, settings: TrainingSettings, run_history: list[tuple], entry: tuple) -> None:
        """The run's and the device's whole epsilon after this round stay within the floor."""
        delta = settings.delta
        limit = self.policy.max_epsilon_per_run
        if limit is not None:
            planned = PrivacyAccountant(settings.accountant, [*run_history, entry]).epsilon(delta)
            if planned > limit:
                raise PolicyRefusal(
                    "epsilon of this run", f"{planned:.3f} after this round", f"at most {limit:g}"
                )
        limit = self.policy.max_epsilon_lifetime
        if limit is not None:
            lifetime = PrivacyAccountant.load(self.state_dir / ACCOUNTANT_FILE, settings.accountant)
            planned = lifetime.epsilon_after(delta, *entry)
            if planned > limit:
                raise PolicyRefusal(
                    "epsilon over the device's life", f"{planned:.3f} after this round", f"at most {limit:g}"
                )
