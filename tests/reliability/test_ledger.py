"""The ledger: hashed keys, two-phase charging, persistence, crash recovery, and the keys CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from bptvlm.cli import main
from bptvlm.server.ledger import Ledger
from bptvlm.shared.errors import BudgetExhaustedError


def test_tokens_are_stored_hashed_and_authenticate(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    token = ledger.create_key("alice", quota=10)
    assert ledger.authenticate(token).name == "alice"
    assert ledger.authenticate(token + "x") is None
    ledger.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert token.encode() not in raw  # only the hash is on disk


def test_revoked_keys_are_refused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    token = ledger.create_key("bob")
    ledger.revoke("bob")
    assert ledger.authenticate(token) is None
    with pytest.raises(KeyError, match="no key named 'carol'"):
        ledger.revoke("carol")
    with pytest.raises(ValueError, match="exists already"):
        ledger.create_key("bob")


def test_two_phase_charging(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.create_key("k", quota=10)
    key = ledger.key("k")
    first = ledger.reserve(key, 6)
    assert ledger.remaining(key) == 4  # in flight counts against the quota
    with pytest.raises(BudgetExhaustedError, match="needs 5 candidates, 4 of the key's 10 remain"):
        ledger.reserve(key, 5)
    ledger.release(ledger.reserve(key, 4))  # failed request: nothing charged
    ledger.commit(first, image_forwards=60)
    assert ledger.usage(key).model_dump() == {"candidates": 6, "requests": 1, "image_forwards": 60}


def test_usage_survives_restarts_and_crashed_reservations_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    ledger = Ledger(path)
    ledger.create_key("k", quota=10)
    key = ledger.key("k")
    ledger.commit(ledger.reserve(key, 3), 0)
    ledger.reserve(key, 5)  # in flight when the server "crashes"
    ledger._db.close()  # no clean shutdown
    reopened = Ledger(path)
    assert reopened.usage(key).candidates == 3 and reopened.remaining(key) == 7
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_keys_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "keys.db")
    assert main(["keys", "create", "--name", "team-a", "--quota", "1000", "--ledger", db]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("bptvlm_") and Ledger(db).authenticate(token).quota == 1000
    assert main(["keys", "list", "--ledger", db]) == 0
    assert capsys.readouterr().out.startswith("team-a\tquota=1000\trpm=-\tactive")
    assert main(["keys", "usage", "team-a", "--ledger", db]) == 0
    assert json.loads(capsys.readouterr().out)["team-a"]["remaining"] == 1000
    assert main(["keys", "revoke", "team-a", "--ledger", db]) == 0
    assert Ledger(db).authenticate(token) is None
    assert main(["keys", "revoke", "nobody", "--ledger", db]) == 2
    assert "no key named 'nobody'" in capsys.readouterr().err
