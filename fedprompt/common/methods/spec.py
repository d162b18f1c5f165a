"""What a method is, declared once and read by both halves: its name, its own settings sections,
the local DP modes and the secure aggregation it supports, the bundle capabilities it needs, and
the global state it starts from and the updates it takes, sized from the bundle's dimensions.

A run's settings are three sections: the core `TrainingSettings` every method reads, the method's
client section (sent to devices in every round task, with the core) and its server section (read
by the server half alone, never sent). A device therefore never sees, and is never stopped by, a
setting of another method or of the server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedprompt.common.bundle_dims import BundleDims
from fedprompt.common.settings import DP_MODES, SettingsError, SettingsSection, TrainingSettings

SECURE_AGGREGATION = ("none", "optional", "required")
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class NoSettings(SettingsSection):
    """A section with no setting in it."""


@dataclass(frozen=True)
class TaskSettings:
    """What a round task carries and a device reads: the core settings and the method's client
    section. JSON form: {"core": {...}, "client": {...}}."""

    method: str
    core: TrainingSettings = field(default_factory=TrainingSettings)
    client: Any = None

    def __post_init__(self) -> None:
        if self.client is None:
            object.__setattr__(self, "client", spec_of(self.method).client_settings())

    def to_dict(self) -> dict[str, Any]:
        return {"core": self.core.to_dict(), "client": self.client.to_dict()}

    @classmethod
    def from_dict(cls, method: str, values: Mapping[str, Any]) -> TaskSettings:
        spec = spec_of(method)
        unknown = sorted(set(values) - {"core", "client"})
        if unknown:
            raise SettingsError(f"unknown settings section(s) {', '.join(unknown)}; known: core, client")
        settings = cls(
            method,
            TrainingSettings.from_dict(values.get("core")),
            spec.client_settings.from_dict(values.get("client")),
        )
        spec.check_task(settings)
        return settings


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a run: the task's (core + client section) and the server section."""

    task: TaskSettings
    server: Any = None

    def __post_init__(self) -> None:
        if self.server is None:
            object.__setattr__(self, "server", self.spec.server_settings())

    @property
    def method(self) -> str:
        return self.task.method

    @property
    def spec(self) -> MethodSpec:
        return spec_of(self.task.method)

    @property
    def core(self) -> TrainingSettings:
        return self.task.core

    @property
    def client(self) -> Any:
        return self.task.client

    def with_core(self, **changes: Any) -> RunSettings:
        """The same settings with some core values changed (checked again)."""
        core = TrainingSettings.from_dict({**self.core.to_dict(), **changes})
        return RunSettings(TaskSettings(self.method, core, self.client), self.server)

    def identity(self) -> dict[str, Any]:
        """The run's identity in the store: the method and every value that differs from its
        default, so a setting added later with a default does not change it."""
        return {
            "method": self.method,
            "core": self.core.non_default(),
            "client": self.client.non_default(),
            "server": self.server.non_default(),
        }

    @classmethod
    def from_sections(
        cls,
        method: str,
        core: Mapping[str, Any] | None = None,
        client: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
    ) -> RunSettings:
        spec = spec_of(method)
        task = TaskSettings(
            method,
            TrainingSettings.from_dict(dict(core or {})),
            spec.client_settings.from_dict(dict(client or {})),
        )
        spec.check_task(task)
        return cls(task, spec.server_settings.from_dict(dict(server or {})))

    @classmethod
    def from_flat(cls, method: str, values: Mapping[str, Any]) -> RunSettings:
        """From one flat map of settings (experiment configs, tests): each key goes to the section
        that owns it; a key of another method is one clear line."""
        spec = spec_of(method)
        sections: dict[str, dict[str, Any]] = {"core": {}, "client": {}, "server": {}}
        owners = {name: "core" for name in TrainingSettings.names()}
        owners |= {name: "client" for name in spec.client_settings.names()}
        owners |= {name: "server" for name in spec.server_settings.names()}
        for name, value in values.items():
            if name not in owners:
                raise SettingsError(unknown_setting(name, method))
            sections[owners[name]][name] = value
        return cls.from_sections(method, sections["core"], sections["client"], sections["server"])


@dataclass(frozen=True)
class MethodSpec:
    """One method's declaration (see the module's docstring). `initial_state` gives the global
    tensors before round 1, `update_shapes` the names and shapes every update must have (default:
    those of the initial state); both from the task settings and the bundle's dimensions, in numpy."""

    name: str
    client_settings: type[SettingsSection]
    server_settings: type[SettingsSection]
    dp_modes: tuple[str, ...]
    secure_aggregation: str  # "none" | "optional" | "required"
    capabilities: tuple[str, ...]
    initial_state: Callable[[TaskSettings, BundleDims], dict[str, np.ndarray]]
    update_shapes: Callable[[TaskSettings, BundleDims], Shapes] | None = None
    weighs_by_examples: bool = True  # False: every client weighs 1 in the (secure) sum
    check_settings: Callable[[TaskSettings], None] | None = None  # checks across sections
    unsummable: Callable[[TaskSettings], str | None] | None = None  # why these updates cannot be summed

    def __post_init__(self) -> None:
        assert set(self.dp_modes) <= set(DP_MODES) and self.secure_aggregation in SECURE_AGGREGATION

    def expected_update(self, task: TaskSettings, dims: BundleDims) -> Shapes:
        if self.update_shapes is not None:
            return self.update_shapes(task, dims)
        return {name: tuple(t.shape) for name, t in self.initial_state(task, dims).items()}

    def check_task(self, task: TaskSettings) -> None:
        """What a device can check of its settings: the DP mode and the cross-section rules."""
        if task.core.dp not in self.dp_modes:
            private = " or ".join(f'"{mode}"' for mode in self.dp_modes if mode != "none")
            raise SettingsError(
                f'method {self.name} does not support dp = "{task.core.dp}": set dp = {private} (or "none")'
            )
        if self.check_settings is not None:
            self.check_settings(task)

    def check_secure_aggregation(self, enabled: bool, task: TaskSettings | None = None) -> None:
        if enabled and task is not None and self.unsummable is not None and (why := self.unsummable(task)):
            raise SettingsError(f"method {self.name} cannot run with [secure_aggregation] enabled: {why}")
        if self.secure_aggregation == "required" and not enabled:
            raise SettingsError(
                f"method {self.name} runs only with [secure_aggregation] enabled = true "
                "(without it the server would see every client's upload)"
            )
        if self.secure_aggregation == "none" and enabled:
            raise SettingsError(
                f"method {self.name} needs every individual update; it cannot run with "
                "[secure_aggregation] enabled"
            )

    def check_capabilities(self, capabilities: Iterable[str], where: str) -> None:
        missing = [c for c in self.capabilities if c not in set(capabilities)]
        if missing:
            raise SettingsError(
                f"method {self.name} needs bundle capability {', '.join(missing)}; {where} lacks it"
            )


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    _SPECS[spec.name] = spec
    return spec


def spec_of(method: str) -> MethodSpec:
    if method not in _SPECS:
        raise SettingsError(f"unknown method {method!r}; known: {', '.join(_SPECS)}")
    return _SPECS[method]


def owner_of(name: str) -> str | None:
    """The method whose client or server section has setting `name` (None: no method's)."""
    for spec in _SPECS.values():
        if name in spec.client_settings.names() or name in spec.server_settings.names():
            return spec.name
    return None


def unknown_setting(name: str, method: str) -> str:
    owner = owner_of(name)
    if owner is not None and owner != method:
        return f"setting {name!r} belongs to method {owner}, not to {method}"
    return f"unknown setting {name!r} for method {method}"
