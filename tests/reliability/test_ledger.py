"""The ledger on both backends (SQLite file, Postgres database): hashed keys, two-phase charging,
persistence, replicas sharing one ledger, crash recovery, and the keys CLI."""

from __future__ import annotations

import itertools
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest

from bptvlm.cli import main
from bptvlm.server.config import Settings
from bptvlm.server.ledger import Ledger, open_backend
from bptvlm.shared.errors import BudgetExhaustedError


def _crash(ledger: Ledger) -> None:
    """Stop as a killed process does: no clean close, the heartbeat just ends."""
    if ledger._heartbeat is not None:
        ledger._heartbeat.set()
    ledger._db.close()


def test_tokens_are_stored_hashed_and_authenticate(ledger_target: str) -> None:
    ledger = Ledger(ledger_target)
    token = ledger.create_key("alice", quota=10)
    assert ledger.authenticate(token).name == "alice"
    assert ledger.authenticate(token + "x") is None
    ledger.close()
    db = open_backend(ledger_target)
    rows = db.execute("SELECT * FROM keys").fetchall()
    db.close()
    assert len(rows) == 1 and token not in repr(rows)  # only the hash is stored
    if not ledger_target.startswith("postgresql://"):
        raw = b"".join(p.read_bytes() for p in Path(ledger_target).parent.iterdir())
        assert token.encode() not in raw  # not on disk either


def test_revoked_keys_are_refused(ledger_target: str) -> None:
    ledger = Ledger(ledger_target)
    token = ledger.create_key("bob")
    ledger.revoke("bob")
    assert ledger.authenticate(token) is None
    with pytest.raises(KeyError, match="no key named 'carol'"):
        ledger.revoke("carol")
    with pytest.raises(ValueError, match="exists already"):
        ledger.create_key("bob")
    ledger.close()


def test_two_phase_charging(ledger_target: str) -> None:
    ledger = Ledger(ledger_target)
    ledger.create_key("k", quota=10)
    key = ledger.key("k")
    first = ledger.reserve(key, 6)
    assert ledger.remaining(key) == 4  # in flight counts against the quota
    with pytest.raises(BudgetExhaustedError, match="needs 5 candidates, 4 of the key's 10 remain"):
        ledger.reserve(key, 5)
    ledger.release(ledger.reserve(key, 4))  # failed request: nothing charged
    ledger.commit(first, image_forwards=60, request_id="r1", fingerprint="f")
    assert ledger.usage(key).model_dump() == {"candidates": 6, "requests": 1, "image_forwards": 60}
    assert ledger.answered(key, "r1") == ("f", 6) and ledger.answered(key, "r2") is None
    ledger.close()


def test_usage_survives_a_crash_and_the_crashed_replicas_holds_lapse(ledger_target: str) -> None:
    a = Ledger(ledger_target, lease_s=0.5)
    a.create_key("k", quota=10)
    key = a.key("k")
    a.commit(a.reserve(key, 3), 0)
    a.reserve(key, 4)  # in flight when replica a is killed
    _crash(a)
    b = Ledger(ledger_target, lease_s=0.5)  # starting meanwhile, b must not take a's hold as dead yet
    assert b.usage(key).candidates == 3 and b.remaining(key) == 3
    time.sleep(0.6)  # a's heartbeat is now older than the lease
    assert b.remaining(key) == 7
    b.close()
    if not ledger_target.startswith("postgresql://"):
        assert sqlite3.connect(ledger_target).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_live_replicas_holds_survive_another_start_and_a_restart_frees_its_own(ledger_target: str) -> None:
    a = Ledger(ledger_target, replica_id="a")
    a.create_key("k", quota=10)
    key = a.key("k")
    live = a.reserve(key, 4)
    b = Ledger(ledger_target, replica_id="b")  # a second replica starts while a's request is in flight
    assert b.remaining(key) == 6
    a.commit(live, 0)
    b.reserve(key, 5)  # in flight when b is killed
    _crash(b)
    assert a.remaining(key) == 1  # b's lease has not lapsed
    Ledger(ledger_target, replica_id="b").close()  # b restarts under its name: its old holds go at once
    assert a.remaining(key) == 6
    a.close()


def test_a_reservation_waits_for_another_replicas_on_the_same_key(
    ledger_target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica a is slow between reading the balance and holding; b's reserve must wait, then see it."""
    a, b = Ledger(ledger_target), Ledger(ledger_target)
    a.create_key("k", quota=10)
    key = a.key("k")
    read_balance, has_read = a._spent, threading.Event()

    def slow_read(key_id: int) -> int:
        spent = read_balance(key_id)
        has_read.set()
        time.sleep(0.3)
        return spent

    monkeypatch.setattr(a, "_spent", slow_read)
    slow = threading.Thread(target=a.reserve, args=(key, 6))
    slow.start()
    assert has_read.wait(10)  # a has read the balance (0) and sleeps inside its transaction
    with pytest.raises(BudgetExhaustedError, match="4 of the key's 10 remain"):
        b.reserve(key, 6)
    slow.join()
    a.close()
    b.close()


def test_replicas_charging_concurrently_never_overdraw(ledger_target: str) -> None:
    """4 replicas (one connection each) x 4 threads reserve 10 at a time, releasing every third."""
    setup = Ledger(ledger_target)
    setup.create_key("k", quota=1000)
    replicas = [Ledger(ledger_target) for _ in range(4)]
    refused: list[int] = []

    def worker(ledger: Ledger) -> None:
        key = ledger.key("k")
        for i in itertools.count():
            try:
                reservation = ledger.reserve(key, 10)
            except BudgetExhaustedError:
                refused.append(1)
                return
            if i % 3 == 2:
                ledger.release(reservation)
            else:
                ledger.commit(reservation, 1)

    threads = [threading.Thread(target=worker, args=(r,)) for r in replicas for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    key = setup.key("k")
    assert setup.usage(key).model_dump() == {"candidates": 1000, "requests": 100, "image_forwards": 100}
    assert len(refused) == 16 and setup.remaining(key) == 0
    for ledger in (*replicas, setup):
        ledger.close()


def test_keys_cli(ledger_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ledger_target
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


def test_a_postgres_url_without_the_driver_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now fails
    url = "postgresql://bptvlm@127.0.0.1:5432/ledger"
    with pytest.raises(RuntimeError, match=r"pip install 'bptvlm\[postgres\]'"):
        Ledger(url)
    with pytest.raises(ValueError, match=r"needs the psycopg driver: pip install 'bptvlm\[postgres\]'"):
        Settings(ledger=url)
    assert main(["keys", "list", "--ledger", url]) == 2
    assert "bptvlm[postgres]" in capsys.readouterr().err
    assert main(["serve", "--ledger", url]) == 2
    assert "needs the psycopg driver: pip install 'bptvlm[postgres]'" in capsys.readouterr().err
