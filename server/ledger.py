"""The ledger: API keys (stored hashed) and what each has been charged, in SQLite (WAL).

Charging is two-phase so that a request is either fully charged and answered or not charged at all:

    reserve(key, n)   one IMMEDIATE transaction: refuse if charged + in flight + n > quota,
                      else record n as in flight under a reservation id
    commit(res)       the answer is ready: move the reservation into the key's usage, and remember
                      the request id (if any), so a retry after a lost answer or a crash is not
                      charged again
    release(res)      the request failed: drop the reservation

Reservations left by a crash were never answered; opening the ledger drops them. Without a path
the ledger lives in memory (open local mode), through the same code.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bptvlm.shared.errors import BudgetExhaustedError
from bptvlm.shared.protocol import Usage

TOKEN_PREFIX = "bptvlm_"
ANSWERED_TTL_S = 7 * 24 * 3600  # how long request ids are remembered for idempotent retries

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    quota INTEGER,
    requests_per_minute INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    key_id INTEGER PRIMARY KEY REFERENCES keys(id),
    candidates INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    image_forwards INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS answered (
    key_id INTEGER NOT NULL REFERENCES keys(id),
    request_id TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    candidates INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (key_id, request_id)
);
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY,
    key_id INTEGER NOT NULL REFERENCES keys(id),
    candidates INTEGER NOT NULL
);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    id: int
    name: str
    quota: int | None
    requests_per_minute: int | None
    revoked: bool = False


@dataclass(frozen=True)
class Reservation:
    id: int
    key: KeyRecord
    candidates: int


class Ledger:
    """Keys and usage. Thread-safe; one connection guarded by a lock (SQLite serialises writes anyway)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        target = ":memory:" if self.path is None else str(self.path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._db.execute("DELETE FROM reservations")  # in flight at a crash: never answered
            self._db.execute("DELETE FROM answered WHERE at < ?", (time.time() - ANSWERED_TTL_S,))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- keys ------------------------------------------------------------------------------------

    def create_key(
        self, name: str, *, quota: int | None = None, requests_per_minute: int | None = None, token: str | None = None
    ) -> str:
        """Add a key; return its token (only its hash is stored, so this is the one time it is seen)."""
        if not name or len(name) > 64:
            raise ValueError("a key name has 1 to 64 characters")
        for label, value in (("quota", quota), ("requests_per_minute", requests_per_minute)):
            if value is not None and value < 0:
                raise ValueError(f"{label} must be >= 0, received {value}")
        token = token or TOKEN_PREFIX + secrets.token_urlsafe(24)
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO keys (name, token_hash, quota, requests_per_minute, created) VALUES (?, ?, ?, ?, ?)",
                    (name, hash_token(token), quota, requests_per_minute, time.time()),
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"a key named {name!r} (or with that token) exists already") from None
        return token

    def revoke(self, name: str) -> None:
        with self._lock:
            if self._db.execute("UPDATE keys SET revoked = 1 WHERE name = ?", (name,)).rowcount == 0:
                raise KeyError(f"no key named {name!r}")

    def keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, quota, requests_per_minute, revoked FROM keys ORDER BY id"
            ).fetchall()
        return [KeyRecord(r[0], r[1], r[2], r[3], bool(r[4])) for r in rows]

    def has_keys(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    def authenticate(self, token: str) -> KeyRecord | None:
        """The active key whose token this is, or None."""
        digest = hash_token(token)
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, quota, requests_per_minute, revoked, token_hash FROM keys WHERE token_hash = ?",
                (digest,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[5], digest) or row[4]:
            return None
        return KeyRecord(row[0], row[1], row[2], row[3])

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
        charged = self._db.execute("SELECT candidates FROM usage WHERE key_id = ?", (key_id,)).fetchone()
        pending = self._db.execute("SELECT SUM(candidates) FROM reservations WHERE key_id = ?", (key_id,)).fetchone()
        return (charged[0] if charged else 0) + (pending[0] or 0)

    def reserve(self, key: KeyRecord, candidates: int) -> Reservation:
        """Hold ``candidates`` of the key's quota, or raise ``BudgetExhaustedError`` charging nothing."""
        with self._lock, self._transaction():
            if key.quota is not None:
                spent = self._spent(key.id)
                if spent + candidates > key.quota:
                    raise BudgetExhaustedError(
                        f"query budget exhausted: this request needs {candidates} candidates, "
                        f"{max(0, key.quota - spent)} of the key's {key.quota} remain"
                    )
            cur = self._db.execute("INSERT INTO reservations (key_id, candidates) VALUES (?, ?)", (key.id, candidates))
            return Reservation(int(cur.lastrowid or 0), key, candidates)

    def commit(
        self, reservation: Reservation, image_forwards: int, request_id: str | None = None, fingerprint: str = ""
    ) -> None:
        """Charge a reserved request that is about to be answered (and remember its id)."""
        with self._lock, self._transaction():
            self._db.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))
            if request_id is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO answered (key_id, request_id, fingerprint, candidates, at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (reservation.key.id, request_id, fingerprint, reservation.candidates, time.time()),
                )
            self._db.execute(
                "INSERT INTO usage (key_id, candidates, requests, image_forwards) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(key_id) DO UPDATE SET candidates = candidates + excluded.candidates, "
                "requests = requests + 1, image_forwards = image_forwards + excluded.image_forwards",
                (reservation.key.id, reservation.candidates, image_forwards),
            )

    def answered(self, key: KeyRecord, request_id: str) -> tuple[str, int] | None:
        """(fingerprint, candidates) of a request this key was already charged for, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, candidates FROM answered WHERE key_id = ? AND request_id = ?", (key.id, request_id)
            ).fetchone()
        return None if row is None else (row[0], row[1])

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            self._db.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
