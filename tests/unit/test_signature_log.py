"""SqliteSignatureLog: group commit under threads, failures reach every caller, close drains, kill -9."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kms.domain.errors import InvalidArgument, KmsError, LimitExceeded
from kms.domain.releases import SignatureRecord
from kms.store.database import Database, Session, StorageFailure
from kms.store.signature_log import SqliteSignatureLog

T0 = datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)


def record(subject: str) -> SignatureRecord:
    return SignatureRecord(
        "spiffe://ci.example/builder", "sign-digest", "keys/k/versions/1", b"\x01" * 32, subject, T0
    )


def subjects(path: Path) -> list[str]:
    """Read through a separate plain sqlite3 connection."""
    conn = sqlite3.connect(path)
    try:
        return [str(r[0]) for r in conn.execute("SELECT subject FROM signatures ORDER BY id")]
    finally:
        conn.close()


def run_threads(count: int, work: Callable[[int], None]) -> list[BaseException]:
    """Run ``work(0) ... work(count - 1)`` on as many threads; return the exceptions raised."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(work, n) for n in range(count)]
    return [error for future in futures if (error := future.exception()) is not None]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "kms.db")
    yield database
    database.close()


@pytest.fixture
def log(db: Database) -> Iterator[SqliteSignatureLog]:
    signature_log = SqliteSignatureLog(db)
    yield signature_log
    signature_log.close()


class CountingTransactions:
    """Wraps ``Database.transaction`` to count the commits the writer makes."""

    def __init__(self, db: Database) -> None:
        self.count = 0
        self._transaction = db.transaction

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Session]:
        with self._transaction() as session:
            yield session
        self.count += 1


def test_eight_threads_times_200_appends_are_all_committed_in_batches(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = CountingTransactions(db)
    monkeypatch.setattr(db, "transaction", commits)
    log = SqliteSignatureLog(db)

    def append_200(t: int) -> None:
        for i in range(200):
            log.append(record(f"{t}-{i}"))

    errors = run_threads(8, append_200)
    log.close()
    assert errors == []
    stored = subjects(db.path)
    assert sorted(stored) == sorted(f"{t}-{i}" for t in range(8) for i in range(200))
    for t in range(8):  # each thread's records in its own order
        assert [s for s in stored if s.startswith(f"{t}-")] == [f"{t}-{i}" for i in range(200)]
    assert commits.count < 1600  # group commit: fewer transactions than records


def test_a_record_round_trips(log: SqliteSignatureLog, db: Database) -> None:
    log.append(record("one"))
    conn = sqlite3.connect(db.path)
    row = conn.execute(
        "SELECT caller, operation, key_version, digest, subject, created_at FROM signatures"
    ).fetchone()
    conn.close()
    assert row == (
        "spiffe://ci.example/builder",
        "sign-digest",
        "keys/k/versions/1",
        b"\x01" * 32,
        "one",
        "2024-05-01T12:00:00.000001Z",
    )


def test_a_failed_batch_reaches_every_caller_and_the_log_recovers(
    log: SqliteSignatureLog, db: Database
) -> None:
    saboteur = sqlite3.connect(db.path)
    saboteur.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON signatures BEGIN SELECT RAISE(ABORT, 'disk gone'); END"
    )
    saboteur.commit()
    errors = run_threads(6, lambda n: log.append(record(f"lost-{n}")))
    assert len(errors) == 6
    assert all(isinstance(e, KmsError) and isinstance(e.__cause__, KmsError) for e in errors)
    assert len({id(e) for e in errors}) == 6  # a fresh exception per caller
    assert all("disk gone" not in str(e) and "INSERT" not in str(e) for e in errors)

    saboteur.execute("DROP TRIGGER refuse")
    saboteur.commit()
    saboteur.close()
    log.append(record("after"))
    assert subjects(db.path) == ["after"]


def test_a_closed_database_fails_the_appends(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "kms.db")
    log = SqliteSignatureLog(db)
    db.close()
    with pytest.raises(StorageFailure, match="closed"):
        log.append(record("x"))
    log.close()


def test_a_malformed_record_fails_alone(log: SqliteSignatureLog, db: Database) -> None:
    naive = SignatureRecord("c", "sign-digest", "keys/k/versions/1", b"", "naive", datetime(2024, 1, 1))
    with pytest.raises(InvalidArgument, match="time zone"):
        log.append(naive)
    log.append(record("fine"))
    assert subjects(db.path) == ["fine"]


def start_appends(
    log: SqliteSignatureLog, names: list[str]
) -> tuple[list[threading.Thread], dict[str, object]]:
    """Append each name from its own thread; outcomes maps name -> "ok" or the exception raised."""
    outcomes: dict[str, object] = {}

    def append(name: str) -> None:
        try:
            log.append(record(name))
            outcomes[name] = "ok"
        except KmsError as e:
            outcomes[name] = e

    threads = [threading.Thread(target=append, args=(name,)) for name in names]
    for t in threads:
        t.start()
    return threads, outcomes


def test_close_commits_what_is_queued_then_refuses(db: Database) -> None:
    log = SqliteSignatureLog(db)
    with db.transaction():  # holds the only writer: records pile up in the log's queue
        threads, outcomes = start_appends(log, [f"queued-{n}" for n in range(20)])
        time.sleep(0.2)
        closer = threading.Thread(target=log.close)
        closer.start()
        time.sleep(0.05)
        assert closer.is_alive()  # close waits for the queued records
    closer.join()
    stored = subjects(db.path)
    for t in threads:
        t.join()
    acknowledged = [name for name, outcome in outcomes.items() if outcome == "ok"]
    assert acknowledged and sorted(stored) == sorted(acknowledged)
    assert all(isinstance(o, StorageFailure) for o in outcomes.values() if o != "ok")  # came after close
    with pytest.raises(StorageFailure, match="closed"):
        log.append(record("late"))
    log.close()  # idempotent


def test_a_full_queue_refuses_with_limit_exceeded(db: Database) -> None:
    log = SqliteSignatureLog(db, max_queue=1, enqueue_timeout=0.1)
    with db.transaction():  # the log's writer blocks holding at most one record; the queue holds one more
        threads, outcomes = start_appends(log, [f"r{n}" for n in range(5)])
        time.sleep(0.5)
    for t in threads:
        t.join()
    log.close()
    refused = [o for o in outcomes.values() if o != "ok"]
    assert len(refused) >= 3 and all(isinstance(o, LimitExceeded) for o in refused)
    assert sorted(subjects(db.path)) == sorted(name for name, o in outcomes.items() if o == "ok")


# A child that appends from four threads and prints each record's subject once append() returned.
_APPENDS_FOREVER = """
import sys, threading
from datetime import UTC, datetime
from kms.domain.releases import SignatureRecord
from kms.store.database import Database
from kms.store.signature_log import SqliteSignatureLog

log = SqliteSignatureLog(Database.open(sys.argv[1]))
lock = threading.Lock()

def append(t):
    for i in range(10**9):
        subject = f"{t}-{i}"
        log.append(SignatureRecord("c", "sign-digest", "keys/k/versions/1", b"d", subject, datetime.now(UTC)))
        with lock:
            print(subject, flush=True)

for t in range(4):
    threading.Thread(target=append, args=(t,)).start()
"""


def test_kill_9_keeps_every_acknowledged_record(tmp_path: Path) -> None:
    path = tmp_path / "kms.db"
    Database.open(path).close()
    child = subprocess.Popen(
        [sys.executable, "-c", _APPENDS_FOREVER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    acknowledged = [child.stdout.readline().strip() for _ in range(500)]
    child.send_signal(signal.SIGKILL)
    acknowledged += [line.strip() for line in child.stdout]  # acks already in the pipe
    child.wait(timeout=10)

    with Database.open(path) as db, db.snapshot() as session:  # recovers the WAL left by the killed child
        stored = {row.text("subject") for row in session.rows("SELECT subject FROM signatures")}
    assert len(acknowledged) >= 500
    assert set(acknowledged) <= stored
