"""SqliteAuditLog on real SQLite files: group commit, checkpoints, tampering through raw SQL, kill -9.

Every tampering scenario is checked twice: on the database (``verify_stored``) and on an export of the
tampered database (``verify_export``), which must name the same record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from kms.domain.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    ChainHead,
    Checkpoint,
    Problem,
    VerificationReport,
    checkpoint_verifier,
    sign_checkpoint,
    verify_export,
)
from kms.domain.errors import DataLoss, FailedPrecondition, HsmUnavailable, InvalidArgument, KmsError
from kms.store.audit import (
    SqliteAuditLog,
    export_jsonl,
    read_checkpoints,
    read_records,
    verify_database,
    verify_stored,
    write_export,
)
from kms.store.database import Database, Session, StorageFailure

T0 = datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)
KEY_VERSION = "keys/audit/versions/1"


class SoftwareSigner:
    """A ``CheckpointSigner`` with an in-memory P-256 key; ``broken`` makes it fail like an absent HSM."""

    def __init__(self) -> None:
        self.key_version = KEY_VERSION
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.broken = False
        self.calls = 0

    def __call__(self, note: bytes) -> bytes:
        self.calls += 1
        if self.broken:
            raise HsmUnavailable("the HSM cannot be reached")
        r, s = decode_dss_signature(self.private_key.sign(note, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    @property
    def public_key_der(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


SIGNER = SoftwareSigner()
VERIFY = checkpoint_verifier({KEY_VERSION: SIGNER.public_key_der})


def event(name: str, **changes: str) -> AuditEvent:
    fields = {
        "caller": "spiffe://kms.example/build-server/ci-1",
        "role": "build-server",
        "operation": "/kmsapi.v1.SigningService/SignDigest",
        "outcome": "OK",
        "request_id": name,
        "product": "thermostat",
        "resource": "digests/00ff",
        "key_version": "keys/fw-sign/versions/2",
    } | changes
    return AuditEvent(time=T0, **fields)


def raw(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run SQL through a plain sqlite3 connection, as someone editing the file would."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def checkpoint_counts(db: Database) -> list[int]:
    return [c.count for c in read_checkpoints(db)]


def has_checkpoint(db: Database, count: int) -> bool:
    return count in checkpoint_counts(db)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "kms.db")
    yield database
    database.close()


@contextlib.contextmanager
def audit_log(db: Database, **options: object) -> Iterator[SqliteAuditLog]:
    log = SqliteAuditLog(db, **options)  # type: ignore[arg-type]
    try:
        yield log
    finally:
        log.close()


# --- Appending --------------------------------------------------------------------------------------------


def test_appends_are_numbered_chained_durable_and_read_back(db: Database) -> None:
    with audit_log(db) as log:
        records = [log.append(event(f"r{n}")) for n in range(5)]
        assert log.head() == ChainHead(5, records[-1].hash)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert [r.prev_hash for r in records] == [GENESIS_HASH] + [r.hash for r in records[:-1]]
    assert all(r.intact for r in records)
    assert read_records(db) == records
    assert read_records(db, first=3, limit=2) == records[2:4]
    assert raw(db.path, "SELECT seq, time, request_id FROM audit_records WHERE seq = 1") == [
        (1, "2024-05-01T12:00:00.000001Z", "r0")
    ]
    with pytest.raises(InvalidArgument):
        read_records(db, first=0)


def test_a_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "kms.db"
    with Database.open(path) as db, audit_log(db) as log:
        last = [log.append(event(f"a{n}")) for n in range(3)][-1]
    with Database.open(path) as db, audit_log(db) as log:
        record = log.append(event("b0"))
        assert (record.seq, record.prev_hash) == (4, last.hash)
        assert verify_stored(db, VERIFY).verified == 4


class CountingTransactions:
    """Wraps ``Database.transaction`` to count commits."""

    def __init__(self, db: Database) -> None:
        self.count = 0
        self._transaction = db.transaction

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Session]:
        with self._transaction() as session:
            yield session
        self.count += 1


def test_eight_threads_append_with_group_commit(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    commits = CountingTransactions(db)
    monkeypatch.setattr(db, "transaction", commits)
    acknowledged: dict[str, int] = {}

    with audit_log(db) as log:

        def append_200(t: int) -> None:
            for i in range(200):
                acknowledged[f"{t}-{i}"] = log.append(event(f"{t}-{i}")).seq

        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(append_200, t) for t in range(8)]:
                future.result()

    assert sorted(acknowledged.values()) == list(range(1, 1601))
    for t in range(8):  # each thread's records in its own order
        seqs = [acknowledged[f"{t}-{i}"] for i in range(200)]
        assert seqs == sorted(seqs)
    assert commits.count < 1600
    report = verify_stored(db, VERIFY)
    assert report.ok and report.verified == 1600


def test_a_failed_batch_fails_every_caller_and_the_chain_goes_on(db: Database) -> None:
    with audit_log(db) as log:
        first = log.append(event("before"))
        raw(
            db.path,
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_records "
            "BEGIN SELECT RAISE(ABORT, 'disk gone'); END",
        )
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(log.append, event(f"lost-{n}")) for n in range(6)]
        errors = [f.exception() for f in futures]
        assert all(isinstance(e, KmsError) and "disk gone" not in str(e) for e in errors)
        assert len({id(e) for e in errors}) == 6  # a fresh exception per caller
        assert log.head() == ChainHead(1, first.hash)
        raw(db.path, "DROP TRIGGER refuse")
        after = log.append(event("after"))
    assert (after.seq, after.prev_hash) == (2, first.hash)
    assert verify_stored(db, VERIFY).verified == 2


def test_close_commits_what_is_queued_then_refuses(db: Database) -> None:
    log = SqliteAuditLog(db)
    with ThreadPoolExecutor(10) as pool:
        with db.transaction():  # holds the only writer: events pile up in the queue
            futures = [pool.submit(log.append, event(f"q{n}")) for n in range(10)]
            time.sleep(0.2)
            closer = threading.Thread(target=log.close)
            closer.start()
            time.sleep(0.05)
            assert closer.is_alive()
        closer.join()
    assert sorted(f.result().seq for f in futures) == list(range(1, 11))
    with pytest.raises(StorageFailure, match="closed"):
        log.append(event("late"))
    log.close()


def test_a_running_log_refuses_to_chain_onto_a_record_changed_behind_its_back(db: Database) -> None:
    with audit_log(db) as log:
        for n in range(3):
            log.append(event(f"r{n}"))
        raw(db.path, "UPDATE audit_records SET outcome = 'NOT_FOUND' WHERE seq = 3")
        raw(db.path, "UPDATE audit_records SET hash = ? WHERE seq = 3", (b"\x07" * 32,))
        for _ in range(2):  # fail closed, every time
            with pytest.raises(DataLoss, match="changed outside this service"):
                log.append(event("next"))
    assert raw(db.path, "SELECT count(*) FROM audit_records") == [(3,)]


def test_a_running_log_notices_its_last_record_deleted(db: Database) -> None:
    with audit_log(db) as log:
        for n in range(3):
            log.append(event(f"r{n}"))
        raw(db.path, "DELETE FROM audit_records WHERE seq = 3")
        with pytest.raises(DataLoss):
            log.append(event("next"))


# --- Checkpoints ------------------------------------------------------------------------------------------


def test_checkpoints_every_n_records_and_a_final_one_at_close(db: Database) -> None:
    with audit_log(db, signer=SIGNER, checkpoint_every=10, checkpoint_interval=3600) as log:
        for n in range(25):
            log.append(event(f"r{n}"))
        wait_until(lambda: checkpoint_counts(db) == [10, 20])
    assert checkpoint_counts(db) == [10, 20, 25]
    report = verify_stored(db, VERIFY)
    assert report.ok and (report.verified, report.signed) == (25, 25)


def test_a_checkpoint_after_t_seconds_with_few_records(db: Database) -> None:
    with audit_log(db, signer=SIGNER, checkpoint_every=1000, checkpoint_interval=0.2) as log:
        for n in range(3):
            log.append(event(f"r{n}"))
        started = time.monotonic()
        wait_until(lambda: checkpoint_counts(db) == [3])
        assert time.monotonic() - started < 2
        assert log.checkpoint() is None  # nothing new to sign


def test_appends_go_on_while_the_signer_fails_and_the_checkpoint_catches_up(db: Database) -> None:
    signer = SoftwareSigner()
    signer.broken = True
    options = {"checkpoint_every": 5, "checkpoint_interval": 3600, "retry_delay": 0.05}
    with audit_log(db, signer=signer, **options) as log:
        for n in range(12):
            log.append(event(f"r{n}"))
        wait_until(lambda: isinstance(log.last_checkpoint_error, HsmUnavailable) and signer.calls >= 2)
        assert checkpoint_counts(db) == []
        signer.broken = False
        wait_until(lambda: checkpoint_counts(db) == [12])
        assert log.last_checkpoint_error is None
    verify = checkpoint_verifier({KEY_VERSION: signer.public_key_der})
    assert verify_stored(db, verify).signed == 12


def test_an_unsigned_tail_left_by_a_crash_is_signed_at_once(db: Database) -> None:
    with audit_log(db) as log:  # no signer: as if the process died before its next checkpoint
        for n in range(7):
            log.append(event(f"r{n}"))
    with audit_log(db, signer=SIGNER, checkpoint_every=1000, checkpoint_interval=3600):
        wait_until(lambda: checkpoint_counts(db) == [7])


def test_a_failed_final_checkpoint_does_not_fail_close(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    signer = SoftwareSigner()
    log = SqliteAuditLog(db, signer, checkpoint_every=1000, checkpoint_interval=3600)
    log.append(event("r0"))
    signer.broken = True
    log.close()
    assert checkpoint_counts(db) == [] and "final audit checkpoint" in caplog.text


def test_without_a_signer_there_are_no_checkpoints(db: Database) -> None:
    with audit_log(db) as log:
        log.append(event("r0"))
        with pytest.raises(FailedPrecondition):
            log.checkpoint()
    assert checkpoint_counts(db) == []


def test_bad_options_are_refused(db: Database) -> None:
    for options in ({"checkpoint_every": 0}, {"checkpoint_interval": 0}, {"max_wait": -1}):
        with pytest.raises(ValueError):
            SqliteAuditLog(db, **options)  # type: ignore[arg-type]


# --- Tampering, detected at the exact record --------------------------------------------------------------


@pytest.fixture
def signed_log(db: Database) -> Database:
    """30 records, checkpoints at 10, 20 and 30."""
    with audit_log(db, signer=SIGNER, checkpoint_every=10, checkpoint_interval=3600) as log:
        for n in range(1, 31):
            log.append(event(f"r{n}"))
            if n % 10 == 0:  # wait, so that checkpoints fall exactly at 10, 20 and 30
                wait_until(functools.partial(has_checkpoint, db, n))
    assert checkpoint_counts(db) == [10, 20, 30]
    return db


def verify_both(db: Database, **options: object) -> VerificationReport:
    """Verify the database and an export of it; both must give the same verdict."""
    report = verify_stored(db, VERIFY, **options)  # type: ignore[arg-type]
    out = io.StringIO()
    write_export(db, out)
    exported = verify_export(io.StringIO(out.getvalue()), VERIFY, **options)  # type: ignore[arg-type]
    assert exported == report
    return report


def outcome(report: VerificationReport) -> tuple[Problem | None, int | None, int | None]:
    return report.problem, report.first_bad, report.checkpoint


def test_the_untampered_log_verifies(signed_log: Database) -> None:
    report = verify_both(signed_log)
    assert report.ok and (report.verified, report.signed) == (30, 30)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("caller", "spiffe://kms.example/security-officer/mallory"),
        ("role", "auditor"),
        ("operation", "/kmsapi.v1.KeyService/ListKeys"),
        ("product", "other"),
        ("resource", "digests/11"),
        ("key_version", "keys/fw-sign/versions/1"),
        ("outcome", "PERMISSION_DENIED"),
        ("request_id", "replayed"),
        ("time", "2024-05-01T12:00:00.000002Z"),
        ("seq", 1000),
        ("prev_hash", b"\x01" * 32),
        ("hash", b"\x02" * 32),
    ],
)
@pytest.mark.parametrize("k", [1, 13, 30])
def test_an_edited_field_is_named(signed_log: Database, column: str, value: object, k: int) -> None:
    raw(signed_log.path, f"UPDATE audit_records SET {column} = ? WHERE seq = ?", (value, k))  # noqa: S608
    report = verify_both(signed_log)
    assert outcome(report) == (Problem.EDITED, k, None)
    assert report.verified == k - 1


def test_an_unreadable_field_is_named(signed_log: Database) -> None:
    raw(signed_log.path, "UPDATE audit_records SET time = 'yesterday' WHERE seq = 13")
    assert outcome(verify_stored(signed_log, VERIFY)) == (Problem.MALFORMED, 13, None)


@pytest.mark.parametrize("k", [1, 13, 29])
def test_a_deleted_record_is_named(signed_log: Database, k: int) -> None:
    raw(signed_log.path, "DELETE FROM audit_records WHERE seq = ?", (k,))
    assert outcome(verify_both(signed_log)) == (Problem.DELETED, k, None)


@pytest.mark.parametrize(("k", "j"), [(1, 2), (13, 17), (29, 30)])
def test_swapped_records_are_named(signed_log: Database, k: int, j: int) -> None:
    """Two rows exchange places in storage order, each keeping its own contents."""
    raw(signed_log.path, "UPDATE audit_records SET id = -1 WHERE seq = ?", (k,))
    raw(signed_log.path, "UPDATE audit_records SET id = ? WHERE seq = ?", (k, j))
    raw(signed_log.path, "UPDATE audit_records SET id = ? WHERE seq = ?", (j, k))
    assert outcome(verify_both(signed_log)) == (Problem.REORDERED, k, None)


def test_truncation_below_a_checkpoint_is_named(signed_log: Database) -> None:
    raw(signed_log.path, "DELETE FROM audit_records WHERE seq > 15")
    report = verify_both(signed_log)
    assert outcome(report) == (Problem.TRUNCATED, 16, 20)
    assert (report.verified, report.signed) == (15, 10)


def test_truncating_records_and_checkpoints_needs_a_kept_checkpoint(signed_log: Database) -> None:
    kept = read_checkpoints(signed_log)[-1]
    raw(signed_log.path, "DELETE FROM audit_records WHERE seq > 15")
    raw(signed_log.path, "DELETE FROM audit_checkpoints WHERE count > 10")
    assert verify_both(signed_log).ok  # the documented limit
    assert outcome(verify_both(signed_log, extra_checkpoints=[kept])) == (Problem.TRUNCATED, 16, 30)


@pytest.mark.parametrize(
    ("sql", "params", "count"),
    [
        ("UPDATE audit_checkpoints SET signature = ? WHERE count = 20", (bytes(64),), 20),
        ("UPDATE audit_checkpoints SET head_hash = ? WHERE count = 20", (b"\x03" * 32,), 20),
        ("UPDATE audit_checkpoints SET time = '2030-01-01T00:00:00.000000Z' WHERE count = 20", (), 20),
        ("UPDATE audit_checkpoints SET count = 19 WHERE count = 20", (), 19),
        ("UPDATE audit_checkpoints SET key_version = 'keys/x/versions/1' WHERE count = 20", (), 20),
        (
            "INSERT INTO audit_checkpoints SELECT 25, hash, '2030-01-01T00:00:00.000000Z', ?, ? "
            "FROM audit_records WHERE seq = 25",
            (KEY_VERSION, bytes(64)),
            25,
        ),
    ],
)
def test_a_forged_checkpoint_is_named(
    signed_log: Database, sql: str, params: tuple[object, ...], count: int
) -> None:
    raw(signed_log.path, sql, params)
    report = verify_both(signed_log)
    assert outcome(report) == (Problem.BAD_SIGNATURE, None, count)


def test_a_checkpoint_signed_by_another_key_is_named(signed_log: Database) -> None:
    head = read_records(signed_log, first=25, limit=1)[0]
    forged = sign_checkpoint(ChainHead(25, head.hash), T0, SoftwareSigner())
    raw(
        signed_log.path,
        "INSERT INTO audit_checkpoints VALUES (25, ?, '2024-05-01T12:00:00.000001Z', ?, ?)",
        (forged.head_hash, forged.key_version, forged.signature),
    )
    assert outcome(verify_both(signed_log)) == (Problem.BAD_SIGNATURE, None, 25)


def test_a_consistent_rewrite_is_caught_by_the_next_checkpoint(signed_log: Database) -> None:
    records = read_records(signed_log)
    prev = records[12].prev_hash
    for record in records[12:]:  # rewrite record 13 and recompute every hash after it
        changed = dataclasses.replace(record.event, outcome="NOT_FOUND") if record.seq == 13 else record.event
        new = AuditRecord.chained(record.seq, prev, changed)
        raw(
            signed_log.path,
            "UPDATE audit_records SET outcome = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (new.event.outcome, new.prev_hash, new.hash, new.seq),
        )
        prev = new.hash
    report = verify_both(signed_log)
    assert outcome(report) == (Problem.CHECKPOINT_MISMATCH, None, 20)
    assert "records 11 to 20" in report.detail


# --- Helpers for kmsctl -----------------------------------------------------------------------------------


def test_verify_database_and_export_jsonl_by_path(signed_log: Database, tmp_path: Path) -> None:
    keys = {KEY_VERSION: SIGNER.public_key_der}
    assert verify_database(signed_log.path, keys).ok
    export = tmp_path / "audit.jsonl"
    with export.open("w", encoding="ascii") as out:
        assert export_jsonl(signed_log.path, out) == 30
    with export.open(encoding="ascii") as lines:
        assert verify_export(lines, checkpoint_verifier(keys)).ok
    raw(signed_log.path, "DELETE FROM audit_records WHERE seq = 4")
    assert outcome(verify_database(signed_log.path, keys)) == (Problem.DELETED, 4, None)
    assert not verify_database(signed_log.path, {"keys/other/versions/1": SIGNER.public_key_der}).ok


def test_an_unreadable_checkpoint_is_reported(signed_log: Database) -> None:
    raw(signed_log.path, "UPDATE audit_checkpoints SET time = 'later' WHERE count = 20")
    assert verify_stored(signed_log, VERIFY).problem is Problem.MALFORMED


# --- Crash: kill -9 while appending -----------------------------------------------------------------------

# Appends from four threads; writes "seq request_id" once append() returned. Checkpoints often.
_APPENDS_FOREVER = """
import sys, threading
from datetime import UTC, datetime
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from kms.domain.audit import AuditEvent
from kms.store.audit import SqliteAuditLog
from kms.store.database import Database

path, key_path, run = sys.argv[1], sys.argv[2], sys.argv[3]
with open(key_path, "rb") as f:
    key = serialization.load_pem_private_key(f.read(), None)

class Signer:
    key_version = "keys/audit/versions/1"
    def __call__(self, note):
        r, s = decode_dss_signature(key.sign(note, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

log = SqliteAuditLog(Database.open(path), Signer(), checkpoint_every=20, checkpoint_interval=0.02)
lock = threading.Lock()

def append(t):
    for i in range(10**9):
        request_id = f"{run}-{t}-{i}"
        record = log.append(AuditEvent(time=datetime.now(UTC), caller="spiffe://kms.example/build-server/x",
            role="build-server", operation="/kmsapi.v1.SigningService/SignDigest", outcome="OK",
            request_id=request_id))
        with lock:
            sys.stdout.write(f"{record.seq} {request_id}\\n")
            sys.stdout.flush()

for t in range(4):
    threading.Thread(target=append, args=(t,)).start()
"""


def test_kill_9_during_appends_leaves_a_chain_that_verifies_with_every_acknowledged_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "kms.db"
    Database.open(path).close()
    key_path = tmp_path / "audit-key.pem"
    key_path.write_bytes(
        SIGNER.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    chance = random.Random(20240501)
    acknowledged: dict[str, int] = {}
    for run in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", _APPENDS_FOREVER, str(path), str(key_path), str(run)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        lines = [child.stdout.readline() for _ in range(chance.randrange(1, 200))]
        assert lines[0].endswith("\n"), "the child did not start appending"
        time.sleep(chance.uniform(0, 0.05))
        child.send_signal(signal.SIGKILL)
        lines += child.stdout.readlines()  # acknowledgements already in the pipe
        child.wait(timeout=10)
        for line in lines:
            if not line.endswith("\n"):  # cut by the kill: that acknowledgement did not arrive
                continue
            seq, request_id = line.split()
            acknowledged[request_id] = int(seq)

        with Database.open(path) as db:  # recovers the WAL left by the killed child
            report = verify_stored(db, VERIFY)
            assert report.ok, report
            stored = {r.event.request_id: r.seq for r in read_records(db, limit=10_000)}
            assert report.verified == len(stored) >= len(acknowledged)
        assert {rid: stored.get(rid) for rid in acknowledged} == acknowledged
    assert len(acknowledged) >= 6


def test_checkpoints_survive_restarts_and_verify(tmp_path: Path) -> None:
    """A log reopened many times keeps one chain; every checkpoint made along the way verifies."""
    path = tmp_path / "kms.db"
    for run in range(3):
        with Database.open(path) as db, audit_log(db, signer=SIGNER, checkpoint_every=4) as log:
            for n in range(10):
                log.append(event(f"{run}-{n}"))
    with Database.open(path) as db:
        report = verify_stored(db, VERIFY)
        assert report.ok and (report.verified, report.signed) == (30, 30)
        assert 10 in checkpoint_counts(db) and 30 in checkpoint_counts(db)


def test_checkpoint_rows_round_trip(db: Database) -> None:
    with audit_log(db, signer=SIGNER, checkpoint_every=1000, checkpoint_interval=3600) as log:
        record = log.append(event("r0"))
        made = log.checkpoint()
    assert isinstance(made, Checkpoint) and made.head_hash == record.hash
    assert read_checkpoints(db) == [made]
    assert VERIFY(made) and made.time > T0 - timedelta(days=1)


def test_verification_stops_at_storage_errors_with_a_domain_error(tmp_path: Path) -> None:
    db = Database.open(tmp_path / "kms.db")
    db.close()
    with pytest.raises(KmsError):
        verify_stored(db, VERIFY)
