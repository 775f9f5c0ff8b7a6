"""The ledger: API keys (stored hashed) and what each has been charged, in SQLite (WAL) or Postgres.

Charging is two-phase so that a request is either fully charged and answered or not charged at all:

    reserve(key, n)   one transaction holding the key's lock: refuse if charged + in flight + n > quota,
                      else record n as in flight under a reservation id
    commit(res)       the answer is ready: move the reservation into the key's usage, and remember
                      the request id (if any), so a retry after a lost answer or a crash is not
                      charged again
    release(res)      the request failed: drop the reservation

Several servers (replicas) may share one ledger, so a reservation belongs to the replica that made it
(``replica_id``), and a replica that reserves beats a heartbeat into ``replicas`` every ``lease_s / 3``.
A reservation counts against its key only while its replica's heartbeat is younger than ``lease_s``:
the holds of a crashed replica stop counting at most ``lease_s`` after the crash, and are swept, while
a starting replica never drops another live one's. A replica restarted under the same ``replica_id``
(``bptvlm serve --replica-id``) drops its previous life's holds at once. A replica stopped cleanly
removes its own. Time is the database's clock, so replicas on different hosts need no clock agreement.

Backends: a path gives SQLite (None: in memory, for open local mode), a ``postgresql://`` URL gives
Postgres (``ledger_postgres.py``). Both run the SQL below; a backend supplies the connection, the
transactions, and ``for_update``: Postgres locks the key's row, SQLite's ``BEGIN IMMEDIATE`` locks
the whole database.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bptvlm.shared.errors import BudgetExhaustedError
from bptvlm.shared.protocol import Usage

log = logging.getLogger(__name__)

TOKEN_PREFIX = "bptvlm_"
ANSWERED_TTL_S = 7 * 24 * 3600  # how long request ids are remembered for idempotent retries
LEASE_S = 15.0  # a replica whose heartbeat is older than this is gone; its reservations stop counting
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
POSTGRES_DRIVER_HINT = "a postgresql:// ledger needs the psycopg driver: pip install 'bptvlm[postgres]'"

# {id}, {int} and {time} are the backend's column types.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS keys (
        id {id},
        name TEXT NOT NULL UNIQUE,
        token_hash TEXT NOT NULL UNIQUE,
        quota {int},
        requests_per_minute {int},
        revoked INTEGER NOT NULL DEFAULT 0,
        created {time} NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS usage (
        key_id {int} PRIMARY KEY REFERENCES keys(id),
        candidates {int} NOT NULL DEFAULT 0,
        requests {int} NOT NULL DEFAULT 0,
        image_forwards {int} NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS answered (
        key_id {int} NOT NULL REFERENCES keys(id),
        request_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        candidates {int} NOT NULL,
        at {time} NOT NULL,
        PRIMARY KEY (key_id, request_id)
    )""",
    """CREATE TABLE IF NOT EXISTS replicas (
        owner TEXT PRIMARY KEY,
        seen {time} NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS in_flight (
        id {id},
        key_id {int} NOT NULL REFERENCES keys(id),
        candidates {int} NOT NULL,
        owner TEXT NOT NULL,
        at {time} NOT NULL
    )""",
    # Reservations of versions without owners: in flight at their last stop, so never answered.
    "DROP TABLE IF EXISTS reservations",
)
# Columns added after a table's first release: (table, column, type), added to ledgers made before them.
_ADDED_COLUMNS = (
    ("keys", "outputs", "TEXT"),  # the key's output policy (server/policy.py); NULL: the server's
)


class Backend(Protocol):
    """A connection to one database, used under the ledger's lock. SQL uses ``?`` placeholders."""

    now: str  # SQL expression: seconds since the epoch by the database's clock
    for_update: str  # suffix that locks the rows a SELECT reads until the transaction ends
    types: dict[str, str]  # the schema's {id}, {int}, {time}
    integrity_error: type[Exception]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...  # a DB-API cursor

    def transaction(self) -> Any: ...  # context manager: commit, or roll back on error

    def migrate(self, statements: Sequence[str]) -> None: ...  # create the schema (concurrent-safe)

    def close(self) -> None: ...


class SQLiteBackend:
    """One SQLite connection; WAL and full sync on disk. ``BEGIN IMMEDIATE`` takes the write lock."""

    now = "((julianday('now') - 2440587.5) * 86400.0)"
    for_update = ""
    types = {"id": "INTEGER PRIMARY KEY", "int": "INTEGER", "time": "REAL"}
    integrity_error: type[Exception] = sqlite3.IntegrityError

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        target = ":memory:" if path is None else str(path)
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def migrate(self, statements: Sequence[str]) -> None:
        with self.transaction():
            for statement in statements:
                self._db.execute(statement)

    def close(self) -> None:
        self._db.close()


def open_backend(target: str | Path | None) -> Backend:
    """SQLite for a path (or None: in memory), Postgres for a ``postgresql://`` URL."""
    if isinstance(target, str) and target.startswith(POSTGRES_SCHEMES):
        from .ledger_postgres import PostgresBackend

        return PostgresBackend(target)
    return SQLiteBackend(None if target is None else Path(target))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: int
    name: str
    quota: int | None
    requests_per_minute: int | None
    revoked: bool = False
    outputs: str | None = None  # the key's output policy (server/policy.py); None: the server's


@dataclass(frozen=True)
class Reservation:
    id: int
    key: KeyRecord
    candidates: int


class Ledger:
    """Keys and usage. Thread-safe: one connection per ledger, guarded by a lock; across processes
    the database's own locks make charging atomic."""

    def __init__(
        self, target: str | Path | None = None, *, replica_id: str | None = None, lease_s: float = LEASE_S
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, received {lease_s}")
        self.replica_id = replica_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease_s = lease_s
        self._db = open_backend(target)
        self._lock = threading.Lock()
        self._heartbeat: threading.Event | None = None  # set to stop it; None until the first reserve
        self._heartbeat_started = threading.Lock()
        with self._lock:
            self._db.migrate([s.format(**self._db.types) for s in _SCHEMA])
            self._add_columns()
            with self._db.transaction():
                self._db.execute("DELETE FROM in_flight WHERE owner = ?", (self.replica_id,))  # a previous life's
                self._sweep()

    def _add_columns(self) -> None:
        """The schema migration of a ledger made by an older version: add the columns it lacks. A replica
        that adds one at the same moment makes the ALTER fail here: the column is there all the same."""
        for table, column, kind in _ADDED_COLUMNS:
            if self._has_column(table, column):
                continue
            try:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                log.info("ledger: added column %s.%s", table, column)
            except Exception:
                if not self._has_column(table, column):
                    raise

    def _has_column(self, table: str, column: str) -> bool:
        try:
            self._db.execute(f"SELECT {column} FROM {table} WHERE 1 = 0").fetchall()
            return True
        except Exception:  # sqlite3.OperationalError / psycopg's UndefinedColumn (outside a transaction)
            return False

    def close(self) -> None:
        """Stop the heartbeat and, as a clean stop, drop this replica's holds and its heartbeat row."""
        with self._lock:
            try:
                if self._heartbeat is not None:
                    self._heartbeat.set()
                    with self._db.transaction():
                        self._db.execute("DELETE FROM in_flight WHERE owner = ?", (self.replica_id,))
                        self._db.execute("DELETE FROM replicas WHERE owner = ?", (self.replica_id,))
            except Exception as exc:  # the holds lapse with the lease instead
                log.warning("ledger: could not remove this replica's holds at close: %s", exc)
            finally:
                self._db.close()

    # --- keys ------------------------------------------------------------------------------------

    def create_key(
        self, name: str, *, quota: int | None = None, requests_per_minute: int | None = None, token: str | None = None,
        outputs: str | None = None,
    ) -> str:
        """Add a key; return its token (only its hash is stored, so this is the one time it is seen).
        ``outputs``: the key's output policy (``ValueError`` unless one of server/policy.py's)."""
        if outputs is not None:
            from .policy import parse_policy

            outputs = parse_policy(outputs).name
        if not name or len(name) > 64:
            raise ValueError("a key name has 1 to 64 characters")
        for label, value in (("quota", quota), ("requests_per_minute", requests_per_minute)):
            if value is not None and value < 0:
                raise ValueError(f"{label} must be >= 0, received {value}")
        token = token or TOKEN_PREFIX + secrets.token_urlsafe(24)
        with self._lock:
            try:
                self._db.execute(
                    f"INSERT INTO keys (name, token_hash, quota, requests_per_minute, outputs, created) "
                    f"VALUES (?, ?, ?, ?, ?, {self._db.now})",
                    (name, hash_token(token), quota, requests_per_minute, outputs),
                )
            except self._db.integrity_error:
                raise ValueError(f"a key named {name!r} (or with that token) exists already") from None
        return token

    def revoke(self, name: str) -> None:
        with self._lock:
            if self._db.execute("UPDATE keys SET revoked = 1 WHERE name = ?", (name,)).rowcount == 0:
                raise KeyError(f"no key named {name!r}")

    def keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, quota, requests_per_minute, revoked, outputs FROM keys ORDER BY id"
            ).fetchall()
        return [KeyRecord(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]

    def has_keys(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    def authenticate(self, token: str) -> KeyRecord | None:
        """The active key whose token this is, or None."""
        digest = hash_token(token)
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, quota, requests_per_minute, revoked, token_hash, outputs FROM keys WHERE token_hash = ?",
                (digest,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[5], digest) or row[4]:
            return None
        return KeyRecord(row[0], row[1], row[2], row[3], outputs=row[6])

    def key(self, name: str) -> KeyRecord:
        found = [k for k in self.keys() if k.name == name]
        if not found:
            raise KeyError(f"no key named {name!r}")
        return found[0]

    # --- usage -----------------------------------------------------------------------------------

    def usage(self, key: KeyRecord) -> Usage:
        with self._lock:
            row = self._db.execute(
                "SELECT candidates, requests, image_forwards FROM usage WHERE key_id = ?", (key.id,)
            ).fetchone()
        return Usage() if row is None else Usage(candidates=row[0], requests=row[1], image_forwards=row[2])

    def remaining(self, key: KeyRecord) -> int | None:
        if key.quota is None:
            return None
        with self._lock:
            return max(0, key.quota - self._spent(key.id))

    def _spent(self, key_id: int) -> int:
        """Charged plus held by live replicas, read in one statement (so one snapshot)."""
        row = self._db.execute(
            "SELECT COALESCE((SELECT candidates FROM usage WHERE key_id = ?), 0) + "
            "COALESCE((SELECT SUM(f.candidates) FROM in_flight f JOIN replicas r ON r.owner = f.owner "
            f"WHERE f.key_id = ? AND r.seen >= {self._db.now} - ?), 0)",
            (key_id, key_id, self.lease_s),
        ).fetchone()
        return int(row[0])

    def reserve(self, key: KeyRecord, candidates: int) -> Reservation:
        """Hold ``candidates`` of the key's quota, or raise ``BudgetExhaustedError`` charging nothing."""
        self._start_heartbeat()
        with self._lock, self._db.transaction():
            self._touch()  # this replica is alive now, whatever its heartbeat did (so the hold counts)
            if key.quota is not None:
                self._lock_key(key.id)
                spent = self._spent(key.id)
                if spent + candidates > key.quota:
                    raise BudgetExhaustedError(
                        f"query budget exhausted: this request needs {candidates} candidates, "
                        f"{max(0, key.quota - spent)} of the key's {key.quota} remain",
                        remaining=max(0, key.quota - spent),
                    )
            row = self._db.execute(
                f"INSERT INTO in_flight (key_id, candidates, owner, at) VALUES (?, ?, ?, {self._db.now}) RETURNING id",
                (key.id, candidates, self.replica_id),
            ).fetchone()
            return Reservation(int(row[0]), key, candidates)

    def commit(
        self, reservation: Reservation, image_forwards: int, request_id: str | None = None, fingerprint: str = ""
    ) -> None:
        """Charge a reserved request that is about to be answered (and remember its id)."""
        key_id = reservation.key.id
        with self._lock, self._db.transaction():
            self._lock_key(key_id)
            self._db.execute("DELETE FROM in_flight WHERE id = ?", (reservation.id,))
            if request_id is not None:
                self._db.execute(
                    f"INSERT INTO answered (key_id, request_id, fingerprint, candidates, at) "
                    f"VALUES (?, ?, ?, ?, {self._db.now}) ON CONFLICT (key_id, request_id) DO UPDATE SET "
                    "fingerprint = excluded.fingerprint, candidates = excluded.candidates, at = excluded.at",
                    (key_id, request_id, fingerprint, reservation.candidates),
                )
            self._db.execute(
                "INSERT INTO usage (key_id, candidates, requests, image_forwards) VALUES (?, ?, 1, ?) "
                "ON CONFLICT (key_id) DO UPDATE SET candidates = usage.candidates + excluded.candidates, "
                "requests = usage.requests + 1, image_forwards = usage.image_forwards + excluded.image_forwards",
                (key_id, reservation.candidates, image_forwards),
            )

    def answered(self, key: KeyRecord, request_id: str, within_s: float | None = None) -> tuple[str, int] | None:
        """(fingerprint, candidates) of a request this key was already charged for, or None; with
        ``within_s``, only if it was answered at most that many seconds ago."""
        window = "" if within_s is None else f" AND at >= {self._db.now} - ?"
        with self._lock:
            row = self._db.execute(
                f"SELECT fingerprint, candidates FROM answered WHERE key_id = ? AND request_id = ?{window}",
                (key.id, request_id) if within_s is None else (key.id, request_id, within_s),
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            self._db.execute("DELETE FROM in_flight WHERE id = ?", (reservation.id,))

    # --- replicas --------------------------------------------------------------------------------

    def _lock_key(self, key_id: int) -> None:
        """Serialise changes to one key's balance across connections (inside a transaction). SQLite's
        ``BEGIN IMMEDIATE`` already holds the database's write lock: nothing to do there."""
        if self._db.for_update:
            self._db.execute(f"SELECT id FROM keys WHERE id = ?{self._db.for_update}", (key_id,))

    def _sweep(self) -> None:
        """Forget replicas whose heartbeat lapsed, their holds, and request ids past their TTL."""
        now, db = self._db.now, self._db
        db.execute(f"DELETE FROM replicas WHERE seen < {now} - ?", (self.lease_s,))
        db.execute("DELETE FROM in_flight WHERE owner NOT IN (SELECT owner FROM replicas)")
        db.execute(f"DELETE FROM answered WHERE at < {now} - ?", (ANSWERED_TTL_S,))

    def _touch(self) -> None:
        self._db.execute(
            f"INSERT INTO replicas (owner, seen) VALUES (?, {self._db.now}) "
            "ON CONFLICT (owner) DO UPDATE SET seen = excluded.seen",
            (self.replica_id,),
        )

    def _beat(self) -> None:
        """Say this replica is alive (its holds keep counting), then sweep the dead ones."""
        with self._lock, self._db.transaction():
            self._touch()
            self._sweep()

    def _start_heartbeat(self) -> None:
        """Beat from the first reservation on (``bptvlm keys`` and idle ledgers never beat)."""
        with self._heartbeat_started:
            if self._heartbeat is None:
                self._heartbeat = threading.Event()
                threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._heartbeat, self.lease_s / 3),
                                 name="ledger-heartbeat", daemon=True).start()


def _heartbeat(ref: weakref.ref[Ledger], stop: threading.Event, every: float) -> None:
    """Beat until the ledger closes (or is garbage: the thread holds no strong reference to it)."""
    while not stop.wait(every):
        ledger = ref()
        if ledger is None:
            return
        try:
            ledger._beat()
        except Exception as exc:  # the database is away: holds lapse if it stays away a whole lease
            if stop.is_set():
                return
            log.warning("ledger heartbeat failed: %s", exc)
        del ledger
