"""The aggregator's persistent state behind one small interface, with SQLite as the embedded default.

Everything the daemon needs to resume after `kill -9` lives here: the run, every committed round
(global tensors, strategy state, metrics, per-client records), the open round (who was sampled,
its deadline, every update accepted so far), enrolment tokens and enrolled clients. A round is
written in ONE transaction that also clears the open round, so a crash leaves either the whole
round or none of it; the daemon resumes the open round with the updates it had accepted, and no
update is applied twice. Secrets (tokens, sessions) are stored only as SHA-256 hashes.

The file carries its schema version (SQLite's user_version); an older file is migrated forward in
one transaction when the daemon opens it (`MIGRATIONS`), so a pre-upgrade state resumes.

Durability: committed rounds, tokens and enrolments are fsynced (synchronous=FULL). An accepted
update is written with synchronous=NORMAL: it survives a crash of the daemon (kill -9) but not a
power cut before the next fsync, in which case its client is simply asked for it again.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedprompt.common.codec import decode_tensor_set, encode_tensor_set
from fedprompt.common.methods import RunSettings
from fedprompt.common.methods.spec import owner_of
from fedprompt.common.settings import TrainingSettings


class StoreError(RuntimeError):
    """The state cannot be used as asked (missing file, another run's state); one readable line."""


class AuthError(StoreError):
    """An enrolment token is unknown or revoked."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    method: str
    settings_json: str  # the run's identity (`RunSettings.identity`)
    created_at: float
    bundle_digest: str = ""  # sha256 of the bundle's manifest.json


@dataclass
class ClientRoundRecord:
    """What one client contributed to one committed round."""

    client_id: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class RoundRecord:
    """One committed round; round 0 is the initial state and has no clients."""

    round_id: int
    tensors: dict[str, np.ndarray]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    clients: list[ClientRoundRecord] = field(default_factory=list)
    committed_at: float = 0.0


@dataclass(frozen=True)
class PendingUpdate:
    """An update accepted into the open round, kept as received until the round commits."""

    client_id: str
    num_examples: int
    metrics: dict[str, float]
    privacy: dict[str, float]
    payload: bytes
    bytes_down: int = 0


@dataclass
class OpenRoundState:
    """The round in progress: enough to resume it after a crash."""

    round_id: int
    sampled: list[str]
    deadline_unix: float
    extensions: int
    started_at: float
    updates: list[PendingUpdate] = field(default_factory=list)


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    label: str
    created_at: float
    revoked: bool
    client_id: str | None


class Store(ABC):
    """What the daemon and the tools need from persistent state."""

    @abstractmethod
    def open_run(self, method: str, settings_json: str, bundle_digest: str, initial: RoundRecord) -> RunInfo:
        """Start a run with round 0 = `initial`, or return the run already stored. A stored run of a
        different method, settings or bundle is an error, so a config change cannot corrupt a run."""

    @abstractmethod
    def run_info(self) -> RunInfo | None:
        """The stored run, if any."""

    @abstractmethod
    def latest_round(self) -> RoundRecord:
        """The last committed round (with tensors and strategy state)."""

    @abstractmethod
    def commit_round(self, record: RoundRecord) -> None:
        """Atomically store the next round (its id must be the latest + 1) and clear the open round."""

    @abstractmethod
    def save_open_round(self, state: OpenRoundState) -> None:
        """Record (or update, after an extension) the round in progress; its updates are not
        touched here, see `add_pending_update`."""

    @abstractmethod
    def add_pending_update(self, round_id: int, update: PendingUpdate) -> None:
        """Keep an accepted update of the open round; durable against a crash of the daemon."""

    @abstractmethod
    def open_round(self) -> OpenRoundState | None:
        """The round in progress after the last committed one, with its accepted updates."""

    @abstractmethod
    def rounds(self) -> list[RoundRecord]:
        """Every committed round after round 0, with metrics and clients but without tensors."""

    @abstractmethod
    def global_tensors(self, round_id: int | None = None) -> dict[str, np.ndarray]:
        """The global tensors after a round (default: the latest)."""

    @abstractmethod
    def issue_token(self, label: str = "") -> str:
        """A new enrolment token (shown once; only its hash is kept)."""

    @abstractmethod
    def revoke_token(self, token_id: str) -> None:
        """Revoke a token by its id; the client enrolled with it loses its session."""

    @abstractmethod
    def tokens(self) -> list[TokenInfo]:
        """All tokens, revoked ones included."""

    @abstractmethod
    def enroll(self, token: str, name: str, device_key: bytes = b"") -> tuple[str, str]:
        """(client id, new session) for a valid token; the same token always gets the same id. The
        first enrolment binds the token to the device's long-term public key (secure aggregation
        signs with it); a later enrolment with another key is refused."""

    @abstractmethod
    def device_keys(self, client_ids: list[str]) -> dict[str, bytes]:
        """The device keys registered for those of `client_ids` that have one."""

    @abstractmethod
    def client_for_session(self, session: str) -> str | None:
        """The client holding this session, or None (unknown, replaced or revoked)."""

    @abstractmethod
    def client_for_token(self, token: str) -> str | None:
        """The client this token enrols (or enrolled) as, or None (unknown or revoked)."""

    @abstractmethod
    def revoked_clients(self, client_ids: list[str]) -> set[str]:
        """Those of `client_ids` whose token has been revoked."""

    @abstractmethod
    def close(self) -> None:
        """Release the underlying resources."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


SCHEMA_VERSION = 2
"""1: before method specs (settings_json = every setting of the one flat settings class, no bundle).
2: settings_json = the run's identity (non-default values per section), the bundle's digest."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    run_id TEXT NOT NULL, method TEXT NOT NULL, settings_json TEXT NOT NULL, created_at REAL NOT NULL,
    bundle_digest TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY, committed_at REAL NOT NULL, tensors BLOB NOT NULL,
    strategy_state TEXT NOT NULL, metrics TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS round_clients (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id), client_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL, metrics TEXT NOT NULL, privacy TEXT NOT NULL,
    bytes_up INTEGER NOT NULL, bytes_down INTEGER NOT NULL, PRIMARY KEY (round_id, client_id));
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, label TEXT NOT NULL,
    created_at REAL NOT NULL, revoked_at REAL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY, token_id TEXT NOT NULL UNIQUE REFERENCES tokens(token_id),
    name TEXT NOT NULL, session_hash TEXT, enrolled_at REAL NOT NULL, device_key TEXT);
CREATE INDEX IF NOT EXISTS clients_by_session ON clients(session_hash);
CREATE TABLE IF NOT EXISTS open_round (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1), round_id INTEGER NOT NULL,
    sampled TEXT NOT NULL, deadline_unix REAL NOT NULL, extensions INTEGER NOT NULL,
    started_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pending_updates (
    round_id INTEGER NOT NULL, client_id TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL, privacy TEXT NOT NULL, bytes_down INTEGER NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (round_id, client_id));
"""


def _identity_from_schema1(method: str, settings_json: str) -> str:
    """Schema 1 stored every setting of every method flat; the run's identity keeps the core ones
    and its own method's (the others never reached it), at their non-default values."""
    flat = json.loads(settings_json)
    own = {
        name: value
        for name, value in flat.items()
        if name in TrainingSettings.names() or owner_of(name) == method
    }
    return json.dumps(RunSettings.from_flat(method, own).identity(), sort_keys=True)


def _differences(stored: str, given: str) -> str:
    """The settings two run identities disagree on, for a refusal line (bounded)."""
    try:
        old, new = json.loads(stored), json.loads(given)
        sections = sorted(set(old) | set(new))
        keys = [
            f"{section}.{key}: {old[section].get(key)!r} stored, {new[section].get(key)!r} given"
            for section in sections
            if isinstance(old.get(section), dict) and isinstance(new.get(section), dict)
            for key in sorted(set(old[section]) | set(new[section]))
            if old[section].get(key) != new[section].get(key)
        ]
    except (ValueError, AttributeError):
        return "unreadable stored settings"
    return "; ".join(keys[:4]) + ("; ..." if len(keys) > 4 else "") or "method"


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE run ADD COLUMN bundle_digest TEXT NOT NULL DEFAULT ''")
    for method, settings_json in db.execute("SELECT method, settings_json FROM run").fetchall():
        db.execute("UPDATE run SET settings_json = ?", (_identity_from_schema1(method, settings_json),))


MIGRATIONS = {1: _migrate_1_to_2}
"""version -> the step that brings a file of that version to the next one."""


class SQLiteStore(Store):
    """SQLite in WAL mode: the daemon writes while `fedprompt aggregator token|status` read or issue
    tokens from other processes. One connection guarded by a lock serves the daemon's threads."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = Path(path)
        if read_only and not self.path.exists():
            raise StoreError(f"no aggregator state at {self.path}")
        try:
            if read_only:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self.schema = self._schema_version()
            if not read_only:
                self._migrate()
        except sqlite3.DatabaseError as error:
            raise StoreError(f"{self.path} is not a usable aggregator state file ({error})") from None
        self._lock = threading.Lock()

    def _schema_version(self) -> int:
        """The file's schema version (a file without tables gets the current one)."""
        if not self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            return SCHEMA_VERSION
        version = self._db.execute("PRAGMA user_version").fetchone()[0] or 1  # 1 never set its version
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has store schema {version}, newer than this fedprompt's "
                f"{SCHEMA_VERSION}: upgrade fedprompt"
            )
        return version

    def _migrate(self) -> None:
        """Bring an older file to the current schema, one transaction per step; then create what
        is missing."""
        while self.schema < SCHEMA_VERSION:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                MIGRATIONS[self.schema](self._db)
                self._db.execute(f"PRAGMA user_version = {self.schema + 1}")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self.schema += 1
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(clients)")}
        if "device_key" not in columns:  # a state file from before device keys
            self._db.execute("ALTER TABLE clients ADD COLUMN device_key TEXT")
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.OperationalError as error:
                raise StoreError(f"{self.path}: {error}") from None

    def _transaction(self, statements: list[tuple[str, tuple]], fsync: bool = True) -> None:
        """All statements or none. `fsync=False` commits without waiting for the disk (still safe
        against a crash of this process, not against a power cut)."""
        with self._lock:
            if not fsync:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, params in statements:
                        self._db.execute(sql, params)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not fsync:
                    self._db.execute("PRAGMA synchronous=FULL")

    def open_run(self, method: str, settings_json: str, bundle_digest: str, initial: RoundRecord) -> RunInfo:
        existing = self.run_info()
        if existing is not None:
            if (existing.method, existing.settings_json) != (method, settings_json):
                raise StoreError(
                    f"{self.path} holds run {existing.run_id} of method {existing.method!r} with other "
                    f"settings ({_differences(existing.settings_json, settings_json)}); use a new state "
                    "file for a new configuration"
                )
            if existing.bundle_digest and existing.bundle_digest != bundle_digest:
                raise StoreError(
                    f"{self.path} holds run {existing.run_id} of bundle {existing.bundle_digest[:12]}, not "
                    f"{bundle_digest[:12]}; use a new state file for another bundle"
                )
            if not existing.bundle_digest:
                self._adopt_bundle(bundle_digest, initial)
            return self.run_info()
        info = RunInfo(f"run-{secrets.token_hex(6)}", method, settings_json, time.time(), bundle_digest)
        self._transaction(
            [
                (
                    "INSERT INTO run VALUES (1, ?, ?, ?, ?, ?)",
                    (info.run_id, method, settings_json, info.created_at, bundle_digest),
                ),
                self._round_row(
                    RoundRecord(0, initial.tensors, initial.strategy_state, committed_at=time.time())
                ),
            ]
        )
        return info

    def _adopt_bundle(self, bundle_digest: str, initial: RoundRecord) -> None:
        """A run migrated from schema 1 learns its bundle; if it committed no round yet, round 0
        becomes the spec's initial state (schema 1 started runs with no global tensors)."""
        tensors, strategy_state = (
            encode_tensor_set(initial.tensors, "fp32"),
            json.dumps(initial.strategy_state),
        )
        self._transaction(
            [
                ("UPDATE run SET bundle_digest = ?", (bundle_digest,)),
                (
                    "UPDATE rounds SET tensors = ?, strategy_state = ? "
                    "WHERE round_id = 0 AND NOT EXISTS (SELECT 1 FROM rounds WHERE round_id > 0)",
                    (tensors, strategy_state),
                ),
            ]
        )

    def run_info(self) -> RunInfo | None:
        digest = "bundle_digest" if self.schema >= 2 else "''"
        rows = self._query(f"SELECT run_id, method, settings_json, created_at, {digest} FROM run")
        return RunInfo(*rows[0]) if rows else None

    @staticmethod
    def _round_row(record: RoundRecord) -> tuple[str, tuple]:
        return (
            "INSERT INTO rounds VALUES (?, ?, ?, ?, ?)",
            (
                record.round_id,
                record.committed_at or time.time(),
                encode_tensor_set(record.tensors, "fp32"),
                json.dumps(record.strategy_state),
                json.dumps(record.metrics),
            ),
        )

    def latest_round(self) -> RoundRecord:
        rows = self._query(
            "SELECT round_id, tensors, strategy_state, metrics, committed_at FROM rounds "
            "ORDER BY round_id DESC LIMIT 1"
        )
        if not rows:
            raise StoreError(f"{self.path} holds no run yet")
        round_id, blob, state, metrics, committed_at = rows[0]
        return RoundRecord(
            round_id,
            decode_tensor_set(blob),
            json.loads(state),
            json.loads(metrics),
            committed_at=committed_at,
        )

    def commit_round(self, record: RoundRecord) -> None:
        latest = self._query("SELECT max(round_id) FROM rounds")[0][0]
        if latest is None or record.round_id != latest + 1:
            raise StoreError(f"round {record.round_id} cannot follow committed round {latest}")
        statements = [self._round_row(record)]
        statements += [
            (
                "INSERT INTO round_clients VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record.round_id,
                    c.client_id,
                    c.num_examples,
                    json.dumps(c.metrics),
                    json.dumps(c.privacy),
                    c.bytes_up,
                    c.bytes_down,
                ),
            )
            for c in record.clients
        ]
        statements += [
            ("DELETE FROM pending_updates WHERE round_id <= ?", (record.round_id,)),
            ("DELETE FROM open_round", ()),
        ]
        self._transaction(statements)

    def save_open_round(self, state: OpenRoundState) -> None:
        self._transaction(
            [
                (
                    "INSERT OR REPLACE INTO open_round VALUES (1, ?, ?, ?, ?, ?)",
                    (
                        state.round_id,
                        json.dumps(sorted(state.sampled)),
                        state.deadline_unix,
                        state.extensions,
                        state.started_at,
                    ),
                )
            ]
        )

    def add_pending_update(self, round_id: int, update: PendingUpdate) -> None:
        row = (
            round_id,
            update.client_id,
            update.num_examples,
            json.dumps(update.metrics),
            json.dumps(update.privacy),
            update.bytes_down,
            update.payload,
        )
        self._transaction([("INSERT INTO pending_updates VALUES (?, ?, ?, ?, ?, ?, ?)", row)], fsync=False)

    def open_round(self) -> OpenRoundState | None:
        rows = self._query(
            "SELECT o.round_id, o.sampled, o.deadline_unix, o.extensions, o.started_at FROM open_round o "
            "WHERE o.round_id = (SELECT max(round_id) + 1 FROM rounds)"
        )
        if not rows:
            return None
        round_id, sampled, deadline_unix, extensions, started_at = rows[0]
        updates = [
            PendingUpdate(client, count, json.loads(metrics), json.loads(privacy), payload, down)
            for client, count, metrics, privacy, down, payload in self._query(
                "SELECT client_id, num_examples, metrics, privacy, bytes_down, payload FROM pending_updates "
                "WHERE round_id = ? ORDER BY client_id",
                (round_id,),
            )
        ]
        return OpenRoundState(round_id, json.loads(sampled), deadline_unix, extensions, started_at, updates)

    def rounds(self) -> list[RoundRecord]:
        records = {
            round_id: RoundRecord(round_id, {}, metrics=json.loads(metrics), committed_at=committed_at)
            for round_id, metrics, committed_at in self._query(
                "SELECT round_id, metrics, committed_at FROM rounds WHERE round_id > 0 ORDER BY round_id"
            )
        }
        for row in self._query("SELECT * FROM round_clients ORDER BY round_id, client_id"):
            round_id, client_id, count, metrics, privacy, up, down = row
            records[round_id].clients.append(
                ClientRoundRecord(client_id, count, json.loads(metrics), json.loads(privacy), up, down)
            )
        return list(records.values())

    def global_tensors(self, round_id: int | None = None) -> dict[str, np.ndarray]:
        if round_id is None:
            rows = self._query("SELECT tensors FROM rounds ORDER BY round_id DESC LIMIT 1")
        else:
            rows = self._query("SELECT tensors FROM rounds WHERE round_id = ?", (round_id,))
        if not rows:
            raise StoreError(f"{self.path} has no round {round_id if round_id is not None else ''}".rstrip())
        return decode_tensor_set(rows[0][0])

    def issue_token(self, label: str = "") -> str:
        token_id = secrets.token_hex(4)
        token = f"{token_id}.{secrets.token_urlsafe(24)}"
        self._transaction(
            [("INSERT INTO tokens VALUES (?, ?, ?, ?, NULL)", (token_id, _hash(token), label, time.time()))]
        )
        return token

    def revoke_token(self, token_id: str) -> None:
        if not self._query("SELECT 1 FROM tokens WHERE token_id = ?", (token_id,)):
            raise StoreError(f"no token with id {token_id!r}")
        self._transaction(
            [
                (
                    "UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                    (time.time(), token_id),
                ),
                ("UPDATE clients SET session_hash = NULL WHERE token_id = ?", (token_id,)),
            ]
        )

    def tokens(self) -> list[TokenInfo]:
        rows = self._query(
            "SELECT t.token_id, t.label, t.created_at, t.revoked_at IS NOT NULL, c.client_id "
            "FROM tokens t LEFT JOIN clients c ON c.token_id = t.token_id ORDER BY t.created_at"
        )
        return [
            TokenInfo(tid, label, created, bool(revoked), client)
            for tid, label, created, revoked, client in rows
        ]

    def enroll(self, token: str, name: str, device_key: bytes = b"") -> tuple[str, str]:
        rows = self._query("SELECT token_id, revoked_at FROM tokens WHERE token_hash = ?", (_hash(token),))
        if not rows:
            raise AuthError("unknown enrolment token")
        token_id, revoked_at = rows[0]
        if revoked_at is not None:
            raise AuthError("enrolment token has been revoked")
        session = secrets.token_urlsafe(32)
        known = self._query("SELECT client_id, device_key FROM clients WHERE token_id = ?", (token_id,))
        client_id = known[0][0] if known else f"c-{token_id}"
        bound = known[0][1] if known else None
        key = device_key.hex() or None
        if bound and key != bound:
            raise AuthError("this enrolment token is bound to another device key")
        self._transaction(
            [
                (
                    "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(client_id) DO UPDATE SET "
                    "session_hash = excluded.session_hash, name = excluded.name, "
                    "device_key = coalesce(clients.device_key, excluded.device_key)",
                    (client_id, token_id, name, _hash(session), time.time(), key),
                )
            ]
        )
        return client_id, session

    def device_keys(self, client_ids: list[str]) -> dict[str, bytes]:
        if not client_ids:
            return {}
        marks = ", ".join("?" * len(client_ids))
        rows = self._query(
            "SELECT client_id, device_key FROM clients "
            f"WHERE device_key IS NOT NULL AND client_id IN ({marks})",
            tuple(client_ids),
        )
        return {client: bytes.fromhex(key) for client, key in rows}

    def client_for_session(self, session: str) -> str | None:
        rows = self._query("SELECT client_id FROM clients WHERE session_hash = ?", (_hash(session),))
        return rows[0][0] if rows else None

    def client_for_token(self, token: str) -> str | None:
        rows = self._query(
            "SELECT t.token_id, c.client_id FROM tokens t LEFT JOIN clients c ON c.token_id = t.token_id "
            "WHERE t.token_hash = ? AND t.revoked_at IS NULL",
            (_hash(token),),
        )
        return (rows[0][1] or f"c-{rows[0][0]}") if rows else None

    def revoked_clients(self, client_ids: list[str]) -> set[str]:
        if not client_ids:
            return set()
        marks = ", ".join("?" * len(client_ids))
        rows = self._query(
            f"SELECT c.client_id FROM clients c JOIN tokens t ON t.token_id = c.token_id "
            f"WHERE t.revoked_at IS NOT NULL AND c.client_id IN ({marks})",
            tuple(client_ids),
        )
        return {row[0] for row in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
