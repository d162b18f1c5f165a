"""The aggregator's configuration: a TOML file with documented defaults, overridable by flags.

Sections: [server] (network, TLS, limits, state file), [rounds] (how rounds are scheduled),
[method] (which method, and the bundle the run uses: the path of its manifest.json),
[aggregation] (how the server combines updates, robust rules), [secure_aggregation] (opt-in
SecAgg/SecAgg+ over the network), [training] (the core `TrainingSettings` every method reads) and
the chosen method's own sections, `[<method>]` (its client settings) and `[<method>.server]` (its
server settings), as its spec declares them (`fedprompt.common.methods`). Tasks carry [training]
and `[<method>]`; the server section stays here. The config is checked against the method's spec
at start (DP mode, secure aggregation, bundle capabilities, settings of another method). Unknown
keys and bad values are errors with one line, because a typo must not silently run with a default.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from aggregator.strategies.combine import RULES
from aggregator.validation import Interval
from fedprompt.common.bundle_dims import BundleDims, BundleDimsError
from fedprompt.common.codec import ENCODINGS
from fedprompt.common.methods import METHOD_NAMES, RunSettings, TaskSettings
from fedprompt.common.methods.spec import owner_of
from fedprompt.common.network import is_loopback
from fedprompt.common.settings import SettingsError


class ConfigError(ValueError):
    """The configuration cannot be used; the message is one line."""


LONG_S = 1e9  # the longest timeout accepted (the in-process harness's "never")
MANY = 10**9  # the largest count accepted


class Section:
    """A config section whose every numeric field has its range in `RANGES`, checked at start
    (`check_ranges`), so that e.g. `server.chunk_kb = 0` stops the daemon with one line instead of
    failing every task later."""

    NAME: ClassVar[str]
    RANGES: ClassVar[dict[str, Interval]]

    def check_ranges(self) -> None:
        for item in fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            allowed = self.RANGES[item.name]
            _require(value in allowed, f"{self.NAME}.{item.name} must be in {allowed}, got {value!r}")


@dataclass(frozen=True)
class ServerConfig(Section):
    """Network, TLS, limits and state. Paths are relative to the config file's folder.

    Outside loopback the daemon only listens with TLS (`tls_cert` + `tls_key`), unless
    `allow_insecure` says plaintext is wanted (e.g. behind a TLS-terminating proxy). With
    `tls_client_ca` it also requires client certificates signed by that CA (mutual TLS)."""

    host: str = "127.0.0.1"  # "0.0.0.0" accepts devices from the network (needs TLS)
    port: int = 50051
    state: str = "fedprompt-aggregator.sqlite"
    tls_cert: str = ""  # PEM server certificate chain (`fedprompt aggregator certs` makes one)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA: require client certificates it signed (mutual TLS)
    allow_insecure: bool = False  # listen without TLS on a non-loopback address
    max_message_mb: float = 4.0  # largest single gRPC message, enforced by both sides
    max_payload_mb: float = 64.0  # largest task/update/model payload after chunking
    chunk_kb: int = 1024  # payload chunk size on the wire
    max_examples: int = 1_000_000  # largest example count an update may claim (it weighs the mean)
    workers: int = 32  # gRPC handler threads (each polling client holds one only briefly)
    max_calls: int = 1024  # calls held at once, running or queued; more are RESOURCE_EXHAUSTED
    max_calls_per_client: int = 4  # open calls of one enrolled client (a poll or upload + a heartbeat)
    max_stranger_calls: int = 4  # calls without a session in their metadata waiting for their message
    first_message_timeout_s: float = 10.0  # a call whose first message is later than this is cut
    idle_timeout_s: float = 30.0  # so is one with a longer gap between messages (chunks) or reads
    task_encoding: str = "fp16"  # how global tensors travel to clients (README: what fp16 and int8 cost)
    update_encoding: str = "fp16"  # how clients must encode updates (fp16: 16 KB for a 16x512 prompt)
    metrics_address: str = (
        ""  # HOST:PORT serving Prometheus metrics at /metrics ("" = off, port 0 = any free)
    )

    NAME = "server"
    RANGES: ClassVar[dict[str, Interval]] = {
        "port": Interval(0, 65535),  # 0 = any free port
        "max_message_mb": Interval(0.01, 2047),  # gRPC limits a message to 2 GiB
        "max_payload_mb": Interval(0.01, 65536),
        "chunk_kb": Interval(1, 2047 * 1024),
        "max_examples": Interval(1, 2**31 - 1),  # stored as an SQLite integer
        "workers": Interval(2, 4096),
        "max_calls": Interval(2, 10**6),
        "max_calls_per_client": Interval(2, 1024),
        "max_stranger_calls": Interval(1, 4095),
        "first_message_timeout_s": Interval(0, 3600, open_low=True),
        "idle_timeout_s": Interval(0, 3600, open_low=True),
    }

    def check(self) -> None:
        self.check_ranges()
        _require(
            self.chunk_kb * 1024 + 4096 <= self.max_message_mb * 2**20,
            "server.chunk_kb must leave room under server.max_message_mb",
        )
        _require(
            self.max_stranger_calls < self.workers,
            "server.max_stranger_calls must be below server.workers (threads must stay for enrolled clients)",
        )
        _require(bool(self.tls_cert) == bool(self.tls_key), "server.tls_cert and server.tls_key go together")
        _require(
            not self.tls_client_ca or bool(self.tls_cert),
            "server.tls_client_ca (mutual TLS) needs server.tls_cert and server.tls_key",
        )
        _require(
            bool(self.tls_cert) or self.allow_insecure or is_loopback(self.host),
            f"server.host {self.host} is not loopback: set server.tls_cert and server.tls_key "
            "(`fedprompt aggregator certs` makes them) or, knowingly, server.allow_insecure = true",
        )
        host, colon, port = self.metrics_address.rpartition(":")
        _require(
            not self.metrics_address or (bool(colon and host) and port.isdigit() and int(port) <= 65535),
            f"server.metrics_address must be HOST:PORT (port 0 = any free), got {self.metrics_address!r}",
        )
        for name in ("task_encoding", "update_encoding"):
            value = getattr(self, name)
            _require(
                value in ENCODINGS, f"server.{name} must be one of {', '.join(ENCODINGS)}, got {value!r}"
            )

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mb * 2**20)


@dataclass(frozen=True)
class RoundConfig(Section):
    """Round scheduling. Each round samples max(min_fit, ceil(fraction * live clients)) clients and
    waits until all of them reported, went silent, or `round_timeout_s` passed. A round with fewer
    than `min_updates` updates by then is extended: the updates received are kept, more live
    clients are sampled and the deadline moves by another `round_timeout_s`."""

    rounds: int = 10
    min_clients: int = 2  # enrolled, live clients needed before round 1 (and any later round) starts
    fraction: float = 1.0
    min_fit: int = 2
    min_updates: int = 2
    round_timeout_s: float = 300.0
    poll_interval_s: float = 2.0  # how long idle clients are told to wait before polling again
    heartbeat_interval_s: float = 10.0
    client_timeout_s: float = 60.0  # a client silent this long (no poll, no heartbeat) is not live
    seed: int = 0  # client sampling

    NAME = "rounds"
    RANGES: ClassVar[dict[str, Interval]] = {
        "rounds": Interval(1, MANY),
        "min_clients": Interval(1, MANY),
        "fraction": Interval(0, 1, open_low=True),
        "min_fit": Interval(1, MANY),
        "min_updates": Interval(1, MANY),
        "round_timeout_s": Interval(0, LONG_S, open_low=True),
        "poll_interval_s": Interval(0, 3600, open_low=True),
        "heartbeat_interval_s": Interval(0, 3600, open_low=True),
        "client_timeout_s": Interval(0, LONG_S, open_low=True),
        "seed": Interval(0, 2**63 - 1),
    }

    def check(self) -> None:
        self.check_ranges()
        _require(
            self.min_updates <= self.min_fit <= self.min_clients,
            "rounds need min_updates <= min_fit <= min_clients",
        )
        _require(
            self.client_timeout_s > 2 * self.heartbeat_interval_s,
            "rounds.client_timeout_s must exceed twice rounds.heartbeat_interval_s",
        )


@dataclass(frozen=True)
class MethodConfig:
    """Which method, and which bundle the run uses (its folder or its manifest.json, relative to
    the config file's folder): the aggregator sizes the global state from it before round 1 and
    every task names its digest."""

    name: str = "promptfl"
    bundle: str = ""

    def check(self) -> None:
        _require(self.name in METHOD_NAMES, f"method.name must be one of {', '.join(METHOD_NAMES)}")
        _require(
            bool(self.bundle),
            "method.bundle must name the run's bundle (the manifest.json `fedprompt export` wrote)",
        )


@dataclass(frozen=True)
class AggregationConfig(Section):
    """How the server half combines the round's updates (for methods that average tensors).

    rule: "mean" (weighted by example counts), "median" (coordinate-wise) or "trimmed_mean"
    (coordinate-wise, floor(trim_fraction * n) values cut at each end); the robust rules ignore
    example counts, which a client could inflate. norm_bound > 0 first clips each update's L2
    distance to the global model. max_update_norm > 0 refuses, on arrival, any update farther
    than that from the global model (under client-level DP an honest update's distance is about
    clip * (1 + noise_multiplier * sqrt(number of values)), so set it well above that)."""

    rule: str = "mean"
    trim_fraction: float = 0.1
    norm_bound: float = 0.0
    max_update_norm: float = 0.0

    NAME = "aggregation"
    RANGES: ClassVar[dict[str, Interval]] = {
        "trim_fraction": Interval(0, 0.5, open_high=True),
        "norm_bound": Interval(),  # 0 = off
        "max_update_norm": Interval(),  # 0 = off
    }

    def check(self) -> None:
        self.check_ranges()
        _require(self.rule in RULES, f"aggregation.rule must be one of {', '.join(RULES)}")


@dataclass(frozen=True)
class SecureAggregationConfig(Section):
    """Secure aggregation (`aggregator.secure_rounds`): the server learns only the sum of the
    surviving clients' updates, for methods whose server half needs nothing else.

    `threshold` t: shares needed to recover a client's secrets; up to t - 1 clients colluding with
    the server learn nothing more than the sum, and a round survives as long as t clients answer
    the unmasking (a session needs at least t + 1 clients). Each session raises it to a majority
    of its members (of a neighbourhood with SecAgg+), never below 3: devices refuse less.
    `degree` 0 = every pair of clients masks (SecAgg), an even k >= t = a random k-regular graph
    (SecAgg+, cost O(k) per client).
    Each step after the first (which waits for training, until the round's deadline) must finish
    within `step_timeout_s`. Values are clipped to [-value_bound, value_bound] and summed modulo
    2**modulus_bits; example counts above `example_cap` weigh as `example_cap`."""

    enabled: bool = False
    threshold: int = 3
    degree: int = 0
    modulus_bits: int = 32
    value_bound: float = 4.0
    example_cap: int = 1000
    step_timeout_s: float = 60.0

    NAME = "secure_aggregation"
    RANGES: ClassVar[dict[str, Interval]] = {
        "threshold": Interval(2, MANY),
        "degree": Interval(0, MANY),
        "modulus_bits": Interval(24, 53),
        "value_bound": Interval(1, 2**20),
        "example_cap": Interval(1, 2**31 - 1),
        "step_timeout_s": Interval(0, LONG_S, open_low=True),
    }

    def check(self) -> None:
        self.check_ranges()
        _require(
            self.degree == 0 or (self.degree % 2 == 0 and self.degree >= self.threshold),
            "secure_aggregation.degree must be 0 (complete graph) or even and >= the threshold",
        )


@dataclass(frozen=True)
class AggregatorConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    settings: RunSettings | None = None  # None: the method's defaults
    base_dir: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        if self.settings is None:
            object.__setattr__(self, "settings", RunSettings(TaskSettings(self.method.name)))

    @property
    def state_path(self) -> Path:
        return self.path(self.server.state)

    @property
    def bundle_path(self) -> Path:
        return self.path(self.method.bundle)

    def bundle_dims(self) -> BundleDims:
        """The run's model as its manifest describes it; ConfigError (one line) when unreadable."""
        try:
            return BundleDims.read(self.bundle_path)
        except BundleDimsError as error:
            raise ConfigError(f"method.bundle: {error}") from None

    def path(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return (self.base_dir / value).resolve()

    def check(self) -> AggregatorConfig:
        self.server.check()
        self.rounds.check()
        self.aggregation.check()
        self.secure_aggregation.check()
        self.method.check()
        _require(
            self.settings.method == self.method.name,
            f"settings are for method {self.settings.method}, the run uses {self.method.name}",
        )
        spec = self.settings.spec
        try:
            spec.check_task(self.settings.task)
            spec.check_secure_aggregation(self.secure_aggregation.enabled, self.settings.task)
            spec.check_capabilities(self.bundle_dims().capabilities, f"bundle {self.method.bundle}")
        except SettingsError as error:
            raise ConfigError(str(error)) from None
        if self.secure_aggregation.enabled:
            _require(
                self.aggregation == AggregationConfig(),
                "secure aggregation gives the server only the sum: leave [aggregation] at its defaults "
                "(no robust rule, norm bound or update-norm check can see individual updates)",
            )
            _require(
                self.rounds.min_fit > self.secure_aggregation.threshold,
                "secure aggregation needs rounds.min_fit > secure_aggregation.threshold "
                "(a session needs at least threshold + 1 clients)",
            )
        return self

    def with_overrides(self, server: dict[str, Any], rounds: dict[str, Any]) -> AggregatorConfig:
        """Apply command-line flags (None = not given) over the file's values."""
        server = {k: v for k, v in server.items() if v is not None}
        rounds = {k: v for k, v in rounds.items() if v is not None}
        if "state" in server:
            server["state"] = str(Path(server["state"]).resolve())
        return dataclasses.replace(
            self,
            server=dataclasses.replace(self.server, **server),
            rounds=dataclasses.replace(self.rounds, **rounds),
        ).check()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _section(cls: type, values: Any, section: str) -> Any:
    """Build a section dataclass, checking names and types against the defaults."""
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(unknown)}; known: {', '.join(known)}")
    parsed = {}
    for name, value in values.items():
        default = known[name].default
        accepted = (int, float) if isinstance(default, float) else (type(default),)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{section}.{name} must be of type {type(default).__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{name} must be finite")
        parsed[name] = type(default)(value)
    return cls(**parsed)


def load_config(path: str | Path | None) -> AggregatorConfig:
    """Read a TOML config (None = all defaults, state in the current folder; not checked yet: it
    names no bundle, which `serve` needs, so `with_overrides` checks it)."""
    if path is None:
        return AggregatorConfig()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    server = _section(ServerConfig, data.get("server", {}), "server")
    rounds = _section(RoundConfig, data.get("rounds", {}), "rounds")
    method = _section(MethodConfig, data.get("method", {}), "method")
    if method.name not in METHOD_NAMES:
        method.check()  # one line naming the methods; the rest is checked with the whole config
    sections = {"server", "rounds", "method", "aggregation", "secure_aggregation", "training", method.name}
    others = sorted(set(data) & set(METHOD_NAMES) - {method.name})
    if others:
        raise ConfigError(f"[{others[0]}] configures another method; this run uses {method.name}")
    unknown = sorted(set(data) - sections)
    if unknown:
        raise ConfigError(
            f"unknown section(s) in {path}: {', '.join(unknown)}; known: {', '.join(sorted(sections))}"
        )
    return AggregatorConfig(
        server=server,
        rounds=rounds,
        method=method,
        settings=_run_settings(method.name, data),
        aggregation=_section(AggregationConfig, data.get("aggregation", {}), "aggregation"),
        secure_aggregation=_section(
            SecureAggregationConfig, data.get("secure_aggregation", {}), "secure_aggregation"
        ),
        base_dir=path.resolve().parent,
    ).check()


def _run_settings(method: str, data: dict[str, Any]) -> RunSettings:
    """[training], [<method>] and [<method>.server] as the method's spec reads them."""
    core = data.get("training", {})
    own = data.get(method, {})
    for name, value in (("training", core), (method, own)):
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
    client = {key: value for key, value in own.items() if key != "server"}
    server = own.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"[{method}.server] must be a table")
    misplaced = sorted(key for key in core if owner_of(key) is not None)
    if misplaced:
        owner = owner_of(misplaced[0])
        where = f"[{owner}] or [{owner}.server]" if owner == method else f"method {owner}'s section"
        raise ConfigError(
            f"[training]: setting {misplaced[0]!r} is not a core setting; it belongs in {where}"
        )
    try:
        return RunSettings.from_sections(method, core, client, server)
    except SettingsError as error:
        raise ConfigError(str(error)) from None
