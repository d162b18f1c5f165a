"""The experiment config: a TOML file whose every key has a documented default.

One file says which data, bundle, split, seeds and rounds to use and which methods to compare; all
methods of a seed run on the same client split. Unknown keys and bad values are one-line errors,
because a typo must not silently run an experiment with a default. See
`fedprompt/harness/experiments/example.toml` for every key with its default and meaning.
"""

from __future__ import annotations

import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from aggregator.config import ServerConfig
from aggregator.strategies.registry import SERVER_STRATEGIES
from edge_client.methods.registry import CLIENT_METHODS
from fedprompt.common.codec import ENCODINGS
from fedprompt.common.methods import RunSettings
from fedprompt.common.settings import SettingsError, TrainingSettings
from fedprompt.harness.splits import DOMAIN_SHIFTS, SplitSettings

ZERO_SHOT = "zero-shot"
LOCAL_ONLY = "local-only"
BASELINES = (ZERO_SHOT, LOCAL_ONLY)
BASELINE_METHOD = "promptfl"  # whose settings the baselines read (local-only trains its client half)
EVALUATIONS = ("balanced", "local")
CLAIM_TESTS = ("beats", "smaller_drop")
CLAIM_METRICS = {"trained": "accuracy", "served": "served_accuracy"}  # -> column of the last round
EMBEDDED = "embedded"


class ExperimentConfigError(ValueError):
    """The experiment config cannot be used; the message is one line."""


@dataclass(frozen=True)
class DataConfig:
    """Where client images come from. `source`: a built-in dataset name or an ImageFolder path.
    `eval_source`: the pool of held-out images (None: the test split of a built-in dataset, else
    `eval_fraction` of every class of `source`, held out before splitting). `skip_first`: images at
    the start of `source` no client gets (None: the ones the embedded tiny CLIP was pretrained on
    when `source` is fashion-mnist, else 0)."""

    source: str = "fashion-mnist"
    eval_source: str | None = None
    eval_fraction: float = 0.2
    skip_first: int | None = None


@dataclass(frozen=True)
class BundleConfig:
    """`path`: a bundle folder from `fedprompt export`, or "embedded" (the committed tiny CLIP,
    exported once into the output's cache). `precision`: image encoder precision (None: the
    bundle's default)."""

    path: str = EMBEDDED
    precision: str | None = None


@dataclass(frozen=True)
class SplitConfig:
    """`fedprompt.harness.splits.SplitSettings` (its seed comes from the experiment's seeds), plus
    `evaluation`: "balanced" scores every client on all classes equally in its own domain; "local"
    keeps, of that balanced set, each class in proportion to the client's training labels (the
    protocol of the DP-FPL and pFedMoAP papers: a client is scored on the classes it holds).

    Generalisation settings (FedMVP's claims), both scored on the model each client is served:
    `base_classes` B > 0 splits the classes into base (the first B) and new (the rest): clients
    train on base-class images only; base and new accuracy are each measured among their own
    classes (CoCoOp's protocol), with their harmonic mean. `unseen_shift` names a domain no
    client trains in: every client is also scored on its held-out images moved into it."""

    num_clients: int = SplitSettings.num_clients
    scheme: str = SplitSettings.scheme
    alpha: float = SplitSettings.alpha
    classes_per_client: int = SplitSettings.classes_per_client
    shifts: tuple[str, ...] = SplitSettings.shifts
    max_train_per_client: int | None = SplitSettings.max_train_per_client
    eval_per_class: int = SplitSettings.eval_per_class
    evaluation: str = "balanced"
    base_classes: int = 0
    unseen_shift: str | None = None

    def settings(self, seed: int) -> SplitSettings:
        return SplitSettings(
            num_clients=self.num_clients,
            scheme=self.scheme,
            alpha=self.alpha,
            classes_per_client=self.classes_per_client,
            shifts=self.shifts,
            max_train_per_client=self.max_train_per_client,
            eval_per_class=self.eval_per_class,
            seed=seed,
        )


@dataclass(frozen=True)
class RoundsConfig:
    """The daemon's round rules for every federated method, and the wire encodings (the daemon's
    defaults unless set; a [[methods]] entry's `encoding` sets both for that entry)."""

    rounds: int = 10
    fraction: float = 1.0
    task_encoding: str = ServerConfig.task_encoding
    update_encoding: str = ServerConfig.update_encoding


@dataclass(frozen=True)
class MethodEntry:
    """One line of the comparison. `method`: a registered federated method, "zero-shot" or
    "local-only". `settings`: over [training], the method's own settings too (each key goes to the
    section of the method's spec that owns it). `target_epsilon` or `match_epsilon_of` (the label
    of another entry, whose final epsilon at the same seed becomes the target) set the noise
    multiplier by searching the accountant, so entries are compared at equal epsilon.
    `task_encoding` / `update_encoding` (None: [rounds]'s) are this entry's wire encodings of the
    tasks and of the clients' updates, so that encodings can be compared on the same split."""

    label: str
    method: str
    settings: RunSettings  # baselines: PromptFL's (local-only trains PromptFL's client half)
    target_epsilon: float | None = None
    match_epsilon_of: str | None = None
    task_encoding: str | None = None
    update_encoding: str | None = None

    @property
    def federated(self) -> bool:
        return self.method not in BASELINES


@dataclass(frozen=True)
class Claim:
    """A paper's claim and the entries that test it. test "beats": `subject` (one label) has a
    higher final accuracy than each of `reference`. test "smaller_drop": `subject` and `reference`
    are [without DP, with DP] pairs; the subject's accuracy drop must be the smaller one.
    `subject_metric` / `reference_metric`: which final accuracy stands for a method, "trained"
    (each client's model after its last round of local training: a personalised method's own
    model) or "served" (the model each client is served after the run: PromptFL's global prompt)."""

    paper: str
    claim: str
    test: str
    subject: tuple[str, ...]
    reference: tuple[str, ...]
    subject_metric: str = "trained"
    reference_metric: str = "trained"


@dataclass(frozen=True)
class AuditConfig:
    """The membership-inference audit (`fedprompt.harness.audit`), run on every federated
    PromptFL entry after the comparison. `trials`: canary trials per entry (half with the
    canaries), `canaries`: mislabelled examples a canary trial inserts into one device's data,
    `confidence` of the Clopper-Pearson bounds, `fpr` at which the attacks' TPR is reported."""

    trials: int = 200
    canaries: int = 8
    confidence: float = 0.95
    fpr: float = 0.01


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    seeds: tuple[int, ...]
    threads: int
    data: DataConfig
    bundle: BundleConfig
    split: SplitConfig
    rounds: RoundsConfig
    methods: tuple[MethodEntry, ...]
    claims: tuple[Claim, ...] = ()
    audit: AuditConfig | None = None
    base_dir: Path = field(default_factory=Path.cwd)

    def entry(self, label: str) -> MethodEntry:
        return next(e for e in self.methods if e.label == label)

    def run_order(self) -> list[MethodEntry]:
        """Entries in the order to run them: one whose epsilon another matches comes first."""
        done: list[MethodEntry] = []
        pending = list(self.methods)
        while pending:
            ready = [
                e
                for e in pending
                if e.match_epsilon_of is None or e.match_epsilon_of in {d.label for d in done}
            ]
            if not ready:
                raise ExperimentConfigError(
                    "match_epsilon_of forms a cycle: " + ", ".join(e.label for e in pending)
                )
            done += ready
            pending = [e for e in pending if e not in ready]
        return done


TOP_LEVEL = {
    "name", "seeds", "threads", "data", "bundle", "split", "rounds", "training", "methods", "claims", "audit"
}  # fmt: skip


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment config; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise ExperimentConfigError(f"cannot read {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ExperimentConfigError(f"{path} is not valid TOML: {error}") from None
    return parse_experiment_config(data, path.resolve().parent, default_name=path.stem)


def parse_experiment_config(data: dict[str, Any], base_dir: Path, default_name: str) -> ExperimentConfig:
    """Build the config from parsed TOML, checking every value."""
    unknown = sorted(set(data) - TOP_LEVEL)
    _require(not unknown, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TOP_LEVEL))}")
    training = _training(data.get("training", {}), "[training]")
    seeds = data.get("seeds", [0])
    _require(
        isinstance(seeds, list)
        and seeds
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
        "seeds must be a non-empty list of integers",
    )
    _require(len(set(seeds)) == len(seeds), "seeds must not repeat")
    threads = data.get("threads", 1)
    _require(
        isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1, "threads must be >= 1"
    )
    name = data.get("name", default_name)
    _require(isinstance(name, str) and name, "name must be a non-empty string")
    methods = tuple(_method(item, training, i) for i, item in enumerate(_tables(data, "methods")))
    config = ExperimentConfig(
        name=name,
        seeds=tuple(seeds),
        threads=threads,
        data=_section(DataConfig, data.get("data", {}), "data"),
        bundle=_section(BundleConfig, data.get("bundle", {}), "bundle"),
        split=_section(SplitConfig, data.get("split", {}), "split"),
        rounds=_section(RoundsConfig, data.get("rounds", {}), "rounds"),
        methods=methods,
        claims=tuple(_claim(item, i) for i, item in enumerate(_tables(data, "claims"))),
        audit=_section(AuditConfig, data["audit"], "audit") if "audit" in data else None,
        base_dir=base_dir,
    )
    _check(config)
    return config


def _check(config: ExperimentConfig) -> None:
    audit = config.audit
    if audit is not None:
        _require(audit.trials >= 20 and audit.trials % 4 == 0, "audit.trials must be a multiple of 4, >= 20")
        _require(audit.canaries >= 1, "audit.canaries must be at least 1")
        _require(
            0.5 <= audit.confidence < 1 and 0 < audit.fpr < 1, "audit.confidence in [0.5, 1), fpr in (0, 1)"
        )
        audited = [e for e in config.methods if e.federated]
        _require(all(e.method == "promptfl" for e in audited), "the audit attacks PromptFL prompts only")
    split, rounds, data = config.split, config.rounds, config.data
    _require(split.num_clients >= 2, "split.num_clients must be at least 2")
    _require(split.scheme in ("dirichlet", "pathological"), "split.scheme must be dirichlet or pathological")
    _require(split.alpha > 0, "split.alpha must be positive")
    _require(split.classes_per_client >= 1, "split.classes_per_client must be at least 1")
    _require(split.eval_per_class >= 1, "split.eval_per_class must be at least 1")
    _require(split.evaluation in EVALUATIONS, f"split.evaluation must be one of {', '.join(EVALUATIONS)}")
    _require(bool(split.shifts), 'split.shifts must name at least one domain ("clean" for none)')
    bad = [s for s in split.shifts if s not in DOMAIN_SHIFTS]
    _require(not bad, f"unknown split.shifts {bad}; choose from {', '.join(DOMAIN_SHIFTS)}")
    _require(split.base_classes >= 0, "split.base_classes must be >= 0 (0 = no base-to-new split)")
    unseen = split.unseen_shift
    _require(
        unseen is None or (unseen in DOMAIN_SHIFTS and unseen not in split.shifts),
        f"split.unseen_shift must be a domain ({', '.join(DOMAIN_SHIFTS)}) that no client trains in",
    )
    cap = split.max_train_per_client
    _require(
        cap is None or cap >= 1, "split.max_train_per_client must be at least 1 (leave it out for no cap)"
    )
    _require(rounds.rounds >= 1, "rounds.rounds must be at least 1")
    _require(0 < rounds.fraction <= 1, "rounds.fraction must be in (0, 1]")
    for key in ("task_encoding", "update_encoding"):
        value = getattr(rounds, key)
        _require(value in ENCODINGS, f"rounds.{key} must be one of {', '.join(ENCODINGS)}, got {value!r}")
    _require(0 < data.eval_fraction < 1, "data.eval_fraction must be in (0, 1)")
    _require(data.skip_first is None or data.skip_first >= 0, "data.skip_first must be >= 0")
    _require(bool(config.methods), "name at least one [[methods]] entry")
    labels = [e.label for e in config.methods]
    _require(len(set(labels)) == len(labels), f"method labels must be unique: {labels}")
    for entry in config.methods:
        if entry.match_epsilon_of is not None:
            _require(entry.match_epsilon_of in labels, f"{entry.label}: match_epsilon_of names no entry")
    config.run_order()
    for claim in config.claims:
        missing = [label for label in claim.subject + claim.reference if label not in labels]
        _require(not missing, f"claim of {claim.paper}: no [[methods]] entry labelled {missing}")


def _method(values: Any, training: dict[str, Any], index: int) -> MethodEntry:
    where = f"[[methods]] #{index + 1}"
    _require(isinstance(values, dict), f"{where} must be a table")
    known = {"label", "method", "settings", "target_epsilon", "match_epsilon_of"}
    known |= {"task_encoding", "update_encoding"}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    method = values.get("method")
    registered = sorted(set(CLIENT_METHODS) & set(SERVER_STRATEGIES))
    _require(
        method in BASELINES or method in registered,
        f"{where}: method must be one of {', '.join([*BASELINES, *registered])}, got {method!r}",
    )
    label = values.get("label", method)
    _require(isinstance(label, str) and label, f"{where}: label must be a non-empty string")
    own = values.get("settings", {})
    _require(isinstance(own, dict), f"{label}: settings must be a table")
    try:
        settings = RunSettings.from_flat(
            BASELINE_METHOD if method in BASELINES else method, {**training, **own}
        )
    except SettingsError as error:
        raise ExperimentConfigError(f"{label}: settings: {error}") from None
    _require(
        "seed" not in own, f"{label}: settings: seed comes from the experiment's seeds, not from settings"
    )
    target = values.get("target_epsilon")
    match = values.get("match_epsilon_of")
    _require(target is None or match is None, f"{label}: give target_epsilon or match_epsilon_of, not both")
    _require(
        target is None or (isinstance(target, int | float) and not isinstance(target, bool) and target > 0),
        f"{label}: target_epsilon must be a positive number",
    )
    _require(match is None or isinstance(match, str), f"{label}: match_epsilon_of must be a label")
    if target is not None or match is not None:
        _require(
            settings.core.dp != "none", f"{label}: an epsilon target needs settings dp = client or sample"
        )
        _require(method != ZERO_SHOT, f"{label}: zero-shot trains nothing and spends no epsilon")
    encodings = {key: values.get(key) for key in ("task_encoding", "update_encoding")}
    for key, encoding in encodings.items():
        _require(
            encoding is None or encoding in ENCODINGS,
            f"{label}: {key} must be one of {', '.join(ENCODINGS)}, got {encoding!r}",
        )
        _require(
            encoding is None or method not in BASELINES, f"{label}: {method} sends nothing over the wire"
        )
    return MethodEntry(label, method, settings, None if target is None else float(target), match, **encodings)


def _claim(values: Any, index: int) -> Claim:
    where = f"[[claims]] #{index + 1}"
    _require(isinstance(values, dict), f"{where} must be a table")
    required = {"paper", "claim", "test", "subject", "reference"}
    unknown = sorted(set(values) - required - {"subject_metric", "reference_metric"})
    _require(not unknown, f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(required - set(values))
    _require(not missing, f"{where}: missing key(s) {', '.join(missing)}")
    metrics = (values.get("subject_metric", "trained"), values.get("reference_metric", "trained"))
    _require(
        all(m in CLAIM_METRICS for m in metrics),
        f"{where}: metrics must be one of {', '.join(CLAIM_METRICS)}",
    )
    test = values["test"]
    _require(test in CLAIM_TESTS, f"{where}: test must be one of {', '.join(CLAIM_TESTS)}")
    subject, reference = _labels(values["subject"], where), _labels(values["reference"], where)
    if test == "beats":
        _require(len(subject) == 1 and reference, f"{where}: beats needs one subject and some references")
    else:
        _require(
            len(subject) == 2 and len(reference) == 2, f"{where}: smaller_drop needs two [no DP, DP] pairs"
        )
    _require(
        all(isinstance(values[k], str) for k in ("paper", "claim")), f"{where}: paper and claim are text"
    )
    return Claim(values["paper"], values["claim"], test, subject, reference, *metrics)


def _labels(value: Any, where: str) -> tuple[str, ...]:
    labels = [value] if isinstance(value, str) else value
    _require(
        isinstance(labels, list) and all(isinstance(v, str) for v in labels), f"{where}: labels expected"
    )
    return tuple(labels)


def _training(values: Any, where: str) -> dict[str, Any]:
    """Check training settings now (one clear line) and keep them as a dict to merge per method."""
    _require(isinstance(values, dict), f"{where} must be a table")
    _require("seed" not in values, f"{where}: seed comes from the experiment's seeds, not from settings")
    try:
        TrainingSettings.from_dict(values)
    except SettingsError as error:
        raise ExperimentConfigError(f"{where}: {error}") from None
    return dict(values)


def _tables(data: dict[str, Any], key: str) -> list[Any]:
    items = data.get(key, [])
    _require(isinstance(items, list), f"{key} must be an array of tables ([[{key}]])")
    return items


def _section(cls: type, values: Any, section: str) -> Any:
    """A section dataclass from a table, checking every key against the field's type."""
    _require(isinstance(values, dict), f"[{section}] must be a table")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    _require(not unknown, f"unknown key(s) in [{section}]: {', '.join(unknown)}; known: {', '.join(known)}")
    return cls(**{name: _typed(value, hints[name], f"{section}.{name}") for name, value in values.items()})


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` as the annotated type (int, float, str, tuple[str, ...], or one of them | None)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    kind = next(o for o in options if o is not type(None))
    if typing.get_origin(kind) is tuple:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        _require(ok, f"{where} must be a list of strings, got {value!r}")
        return tuple(value)
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        _require(ok, f"{where} must be a number, got {value!r}")
        return float(value)
    _require(
        isinstance(value, kind) and not isinstance(value, bool),
        f"{where} must be {kind.__name__}, got {value!r}",
    )
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ExperimentConfigError(message)
