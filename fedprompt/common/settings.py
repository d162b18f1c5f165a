"""The one set of training and method settings, parsed alike by the aggregator's config and the client.

Settings travel in every round task as JSON (`to_dict`), so both halves of a method read the same
values; `from_dict` rejects unknown keys and bad values with one clear line, because a typo in a
config file must not silently fall back to a default. Choices of the device alone (the image
encoder's precision, the local hold-out split) are not settings: the client gives them when it
loads its workspace.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from fedprompt.common.privacy_labels import ACCOUNTANT_KINDS

DP_MODES = ("none", "client", "sample")
OPTIMIZERS = ("sgd", "adam")


class SettingsError(ValueError):
    """A setting is unknown, has the wrong type or is out of range; the message is one line."""


# Read by server halves only, so never sent to devices: clients reject setting keys they do not
# know, and a server-side setting added in a newer aggregator must not stop older clients.
SERVER_ONLY_SETTINGS = frozenset(
    {"server_lr", "global_clip", "global_noise_multiplier", "split_gain", "min_cluster_size"}
)


@dataclass(frozen=True)
class TrainingSettings:
    """How a client trains in a round and which local DP it applies.

    dp = "client": the round's prompt update is clipped to `clip` and noised with std
    `noise_multiplier * clip` on the device. dp = "sample": DP-SGD with per-example clipping to
    `clip`, noise std `noise_multiplier * clip` on each step's gradient sum, Poisson sampling with
    rate batch_size / local examples. `epsilon_budget` (None = no limit) makes a client refuse a
    round whose accounting would exceed it at `delta`.

    Method-specific settings (ignored by the other methods): DP-FPL's `rank` of the local prompt's
    low-rank part, and its server-side global DP (each client's global-prompt update clipped to
    `global_clip`, noise of std `global_noise_multiplier * global_clip` on their sum; 0 = off);
    pFedMoAP's `experts` (K prompts mixed per class: the local one and K-1 downloaded),
    `mixture_lambda` (weight of the local logits) and its gating network (`gating_dim`,
    `gating_heads`, `gating_scaling` of the attention scores). SecFPP's `clusters` (the most domain
    clusters: the slots of its securely summed upload), `cluster_dim` (size of the public random
    projection of a client's first domain-prompt update that clients are clustered on) and
    `split_gain` (a cluster is split in two when that would explain at least this share of the
    total scatter of the projections); `min_cluster_size` (a cluster with fewer clients is not
    released: its sums are held back and its clients join the nearest released one).
    """

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
    rank: int = 8
    global_clip: float = 1.0
    global_noise_multiplier: float = 0.0
    server_lr: float = 1.0
    experts: int = 10
    mixture_lambda: float = 0.5
    gating_dim: int = 128
    gating_heads: int = 8
    gating_scaling: float = 10.0
    clusters: int = 4
    cluster_dim: int = 8
    split_gain: float = 0.1
    min_cluster_size: int = 3

    def __post_init__(self) -> None:
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
        self._check(self.rank >= 1, "rank", "must be at least 1")
        self._check(self.global_clip > 0, "global_clip", "must be positive")
        self._check(self.global_noise_multiplier >= 0, "global_noise_multiplier", "must be >= 0 (0 = off)")
        self._check(0 < self.server_lr <= 1, "server_lr", "must be in (0, 1]")
        self._check(self.experts >= 1, "experts", "must be at least 1")
        self._check(self.mixture_lambda >= 0, "mixture_lambda", "must be >= 0")
        self._check(self.gating_heads >= 1, "gating_heads", "must be at least 1")
        self._check(self.gating_dim >= 1, "gating_dim", "must be at least 1")
        divisible = self.gating_dim % self.gating_heads == 0
        self._check(divisible, "gating_dim", "must be a multiple of gating_heads")
        self._check(self.gating_scaling > 0, "gating_scaling", "must be positive")
        self._check(self.clusters >= 1, "clusters", "must be at least 1")
        self._check(self.cluster_dim >= 2, "cluster_dim", "must be at least 2")
        self._check(0 < self.split_gain < 1, "split_gain", "must be in (0, 1)")
        self._check(self.min_cluster_size >= 1, "min_cluster_size", "must be at least 1")

    @staticmethod
    def _check(ok: bool, name: str, requirement: str) -> None:
        if not ok:
            raise SettingsError(f"setting {name!r} {requirement}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> TrainingSettings:
        """Parse a config section or a round task's settings; unknown keys are an error."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        parsed = {name: _coerce(name, value, known[name].default) for name, value in values.items()}
        return cls(**parsed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form that `from_dict` reads back to an equal object."""
        return asdict(self)

    def for_clients(self) -> dict[str, Any]:
        """What a round task carries: every setting except the server-only ones."""
        return {name: value for name, value in asdict(self).items() if name not in SERVER_ONLY_SETTINGS}


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
