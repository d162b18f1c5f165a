"""Settings sections both halves parse alike: the core training settings every method reads, and
the base of each method's own client and server sections (`fedprompt.common.methods`).

A section is a frozen dataclass whose fields all have defaults; `from_dict` rejects unknown keys
and bad values with one clear line, because a typo in a config file must not silently fall back
to a default. Choices of the device alone (the image encoder's precision, the local hold-out
split) are not settings: the client gives them when it loads its workspace.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, TypeVar

from fedprompt.common.privacy_labels import ACCOUNTANT_KINDS

DP_MODES = ("none", "client", "sample")
OPTIMIZERS = ("sgd", "adam")

S = TypeVar("S", bound="SettingsSection")


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type or is out of range; the message is one line."""


@dataclass(frozen=True)
class SettingsSection:
    """Base of every settings section: typed fields with defaults, checked on construction."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise SettingsError (one line) for a value out of range; nothing to check by default."""

    @staticmethod
    def _check(ok: bool, name: str, requirement: str) -> None:
        if not ok:
            raise SettingsError(f"setting {name!r} {requirement}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls: type[S], values: dict[str, Any] | None) -> S:
        """Parse a config section or a round task's section; unknown keys are an error."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            listed = ", ".join(known) or "none"
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {listed}")
        parsed = {name: _coerce(name, value, known[name].default) for name, value in values.items()}
        return cls(**parsed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form that `from_dict` reads back to an equal object."""
        return asdict(self)

    def non_default(self) -> dict[str, Any]:
        """The values that differ from the defaults: what identifies a run, so that a new setting
        with a default in a later version leaves the identity of existing runs unchanged."""
        default = type(self)()
        return {name: value for name, value in asdict(self).items() if getattr(default, name) != value}


@dataclass(frozen=True)
class TrainingSettings(SettingsSection):
    """How a client trains in a round and which local DP it applies (every method reads these).

    dp = "client": the round's prompt update is clipped to `clip` and noised with std
    `noise_multiplier * clip` on the device. dp = "sample": DP-SGD with per-example clipping to
    `clip`, noise std `noise_multiplier * clip` on each step's gradient sum, Poisson sampling with
    rate batch_size / local examples. `epsilon_budget` (None = no limit) makes a client refuse a
    round whose accounting would exceed it at `delta`. A method's own settings are in its client
    and server sections (`fedprompt.common.methods`)."""

    n_ctx: int = 16
    ctx_init_std: float = 0.02
    lr: float = 0.002
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    local_epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    dp: str = "none"
    clip: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float | None = None
    accountant: str = "prv"

    def check(self) -> None:
        self._check(self.n_ctx >= 1, "n_ctx", "must be at least 1")
        self._check(self.ctx_init_std > 0, "ctx_init_std", "must be positive")
        self._check(self.lr > 0, "lr", "must be positive")
        self._check(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        self._check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        self._check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._check(self.local_epochs >= 1, "local_epochs", "must be at least 1")
        self._check(self.batch_size >= 1, "batch_size", "must be at least 1")
        self._check(self.dp in DP_MODES, "dp", f"must be one of {', '.join(DP_MODES)}")
        self._check(self.clip > 0, "clip", "must be positive")
        self._check(self.noise_multiplier >= 0, "noise_multiplier", "must be >= 0")
        if self.dp != "none":
            self._check(self.noise_multiplier > 0, "noise_multiplier", "must be positive when dp is on")
        self._check(0 < self.delta < 1, "delta", "must be in (0, 1)")
        budget = self.epsilon_budget
        self._check(budget is None or budget > 0, "epsilon_budget", "must be positive (or null for none)")
        kinds = ", ".join(ACCOUNTANT_KINDS)
        self._check(self.accountant in ACCOUNTANT_KINDS, "accountant", f"must be one of {kinds}")


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Check a value against the type of its default (ints accepted for floats, never bools)."""
    if default is MISSING:
        return value
    if value is None:
        if default is None:
            return None
        raise SettingsError(f"setting {name!r} must not be null")
    if isinstance(value, bool):
        raise SettingsError(f"setting {name!r} must not be a boolean")
    if isinstance(default, int):
        if not isinstance(value, int):
            raise SettingsError(f"setting {name!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float) or default is None:
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise SettingsError(f"setting {name!r} must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise SettingsError(f"setting {name!r} must be a string, got {value!r}")
    return value
