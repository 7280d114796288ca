"""``SqliteAuditLog``: the audit log in SQLite, appended with group commit, checkpointed with the audit key.

The records, their hash chain and the checkpoint format are ``kms.domain.audit``; this module stores them in
the tables ``audit_records`` and ``audit_checkpoints`` (migration 4 of ``kms.store.database``), reads them
back, verifies and exports them.

Appending (group commit)
------------------------
``append(event)`` validates the event, queues it and blocks until a background writer thread has committed a
transaction holding it, then returns the ``AuditRecord`` as stored: the record is durable
(``synchronous=FULL``) before the caller answers its RPC. The writer takes everything queued (up to
``max_batch``), and inside ONE ``BEGIN IMMEDIATE`` transaction numbers the events, chains each to the one
before and inserts them; one WAL fsync covers the batch, and batches grow with the load by themselves.
Sequence numbers and hashes are therefore assigned under the database's write lock, in commit order.
``max_queue``, ``enqueue_timeout`` (then ``LimitExceeded``), failure of a whole batch (every caller gets a
fresh exception, nothing of the batch is stored) and ``close`` behave as in ``SqliteSignatureLog``. Never call
``append`` inside a ``Database.transaction`` block: the writer would wait for that block.

Several server processes may share one database (a payload download resumes on any of them), so every batch
chains to the last record in the file, read inside its ``BEGIN IMMEDIATE`` transaction. When that is not the
head this process committed last (another process appended meanwhile), the writer adopts it only if that
record is intact (its stored hash recomputes from its fields and previous hash) and it continues the head
this process knew (its sequence number is higher); otherwise the batch fails with ``DataLoss`` (fail
closed). Edits deeper in the chain are what ``verify_chain`` and the signed checkpoints catch.

Checkpoints
-----------
With a ``CheckpointSigner``, a second thread signs and stores a checkpoint of the committed head when
``checkpoint_every`` records are unsigned, or when the oldest unsigned record is ``checkpoint_interval``
seconds old. Signing is off the append path (only the checkpoint's one-row commit queues with the
writer's batches). If signing or storing fails (HSM unreachable), appends go on, the
error is logged and kept in ``last_checkpoint_error``, and the attempt is repeated after ``retry_delay``
seconds; the next checkpoint covers everything. A log opened on a file whose last records are unsigned (after
a crash) signs them at once. ``close`` signs a final checkpoint, so after an orderly shutdown no record is
unsigned. ``checkpoint()`` signs one now.

Reading
-------
``read_records``, ``read_checkpoints``, ``verify_stored`` and ``write_export`` take a ``Database`` and run in
one read snapshot; ``verify_database`` and ``export_jsonl`` open the file by path (applying pending migrations
as the service would; to verify without touching a file, export it and use ``kms.domain.audit.verify_export``
on the copy). A row that cannot be read as a record (a wrong type, a malformed time) raises
``MalformedAuditData``; verification reports it as ``MALFORMED`` at that record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from kms.domain.audit import (
    EMPTY_HEAD,
    AuditEvent,
    AuditRecord,
    ChainHead,
    Checkpoint,
    CheckpointSigner,
    MalformedAuditData,
    SignatureCheck,
    VerificationReport,
    checkpoint_json,
    checkpoint_verifier,
    export_header,
    parse_time,
    record_json,
    sign_checkpoint,
    time_text,
    verify_chain,
)
from kms.domain.errors import DataLoss, FailedPrecondition, InvalidArgument, KmsError, LimitExceeded
from kms.store.database import Database, Row, Session, StorageFailure

_log = logging.getLogger("kms.audit")

_INSERT_RECORD = (
    "INSERT INTO audit_records (seq, time, caller, role, operation, product, resource, key_version, outcome, "
    "request_id, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_RECORDS = (
    "SELECT id, seq, time, caller, role, operation, product, resource, key_version, outcome, request_id, "
    "prev_hash, hash FROM audit_records "
)
_FIRST_PAGE = _SELECT_RECORDS + "ORDER BY id LIMIT ?"
_NEXT_PAGE = _SELECT_RECORDS + "WHERE id > ? ORDER BY id LIMIT ?"
_BY_SEQ = _SELECT_RECORDS + "WHERE seq >= ? ORDER BY seq LIMIT ?"
_INSERT_CHECKPOINT = (
    "INSERT OR IGNORE INTO audit_checkpoints (count, head_hash, time, key_version, signature) "
    "VALUES (?, ?, ?, ?, ?)"
)
_PAGE = 1000


# --- Rows -------------------------------------------------------------------------------------------------


def _record_row(record: AuditRecord) -> tuple[object, ...]:
    event = record.event
    return (
        record.seq,
        time_text(event.time),
        event.caller,
        event.role,
        event.operation,
        event.product,
        event.resource,
        event.key_version,
        event.outcome,
        event.request_id,
        record.prev_hash,
        record.hash,
    )


def _record(row: Row) -> AuditRecord:
    try:
        event = AuditEvent(
            time=parse_time(row.text("time")),
            caller=row.text("caller"),
            role=row.text("role"),
            operation=row.text("operation"),
            outcome=row.text("outcome"),
            request_id=row.text("request_id"),
            product=row.text("product"),
            resource=row.text("resource"),
            key_version=row.text("key_version"),
        )
        return AuditRecord(row.integer("seq"), row.blob("prev_hash"), event, row.blob("hash"))
    except (InvalidArgument, DataLoss) as e:
        raise MalformedAuditData(f"a stored audit record cannot be read: {e}") from e


def _checkpoint(row: Row) -> Checkpoint:
    try:
        return Checkpoint(
            row.integer("count"),
            row.blob("head_hash"),
            parse_time(row.text("time")),
            row.text("key_version"),
            row.blob("signature"),
        )
    except (InvalidArgument, DataLoss) as e:
        raise MalformedAuditData(f"a stored audit checkpoint cannot be read: {e}") from e


def _stored_head(session: Session) -> ChainHead:
    """The last record in storage order: the head the next record chains to."""
    row = session.row("SELECT seq, hash FROM audit_records ORDER BY id DESC LIMIT 1")
    return EMPTY_HEAD if row is None else ChainHead(row.integer("seq"), row.blob("hash"))


def _adopt(session: Session, known: ChainHead, stored: ChainHead) -> ChainHead:
    """The head another process left, if its last record is intact and continues ``known``."""
    row = session.row("SELECT * FROM audit_records ORDER BY id DESC LIMIT 1")
    last = None if row is None else _record(row)
    if last is None or not last.intact or stored.count <= known.count:
        raise DataLoss("the audit log was changed outside this service: verify it before restarting")
    return stored


def _last_checkpoint(session: Session) -> int:
    row = session.row("SELECT max(count) AS count FROM audit_checkpoints")
    return 0 if row is None else row.optional_integer("count") or 0


def _records_in_storage_order(session: Session) -> Iterator[AuditRecord]:
    """Every record, in id order, read a page at a time (ids may be anything after tampering)."""
    rows = session.rows(_FIRST_PAGE, [_PAGE])
    while rows:
        yield from (_record(row) for row in rows)
        rows = session.rows(_NEXT_PAGE, [rows[-1].integer("id"), _PAGE])


def _checkpoints(session: Session) -> list[Checkpoint]:
    return [
        _checkpoint(row)
        for row in session.rows(
            "SELECT count, head_hash, time, key_version, signature FROM audit_checkpoints ORDER BY count"
        )
    ]


# --- Reading, verifying, exporting ------------------------------------------------------------------------


def read_records(db: Database, first: int = 1, limit: int = _PAGE) -> list[AuditRecord]:
    """Up to ``limit`` records numbered ``first`` or more, in number order (a page for a listing)."""
    if first < 1 or not 1 <= limit <= 10 * _PAGE:
        raise InvalidArgument(f"read from record 1 or later, at most {10 * _PAGE} records at a time")
    with db.snapshot() as session:
        return [_record(row) for row in session.rows(_BY_SEQ, [first, limit])]


def read_checkpoints(db: Database) -> list[Checkpoint]:
    """Every stored checkpoint, by count."""
    with db.snapshot() as session:
        return _checkpoints(session)


def verify_stored(
    db: Database, verify_signature: SignatureCheck, extra_checkpoints: Iterable[Checkpoint] = ()
) -> VerificationReport:
    """``verify_chain`` over the stored records and checkpoints (plus checkpoints kept from elsewhere)."""
    with db.snapshot() as session:

        def checkpoints() -> Iterator[Checkpoint]:
            yield from _checkpoints(session)
            yield from extra_checkpoints

        return verify_chain(_records_in_storage_order(session), checkpoints(), verify_signature)


def write_export(db: Database, out: TextIO) -> int:
    """Write the log as JSON lines (``kms.domain.audit``: header, checkpoints, records); the record count."""
    count = 0
    with db.snapshot() as session:
        out.write(export_header() + "\n")
        for checkpoint in _checkpoints(session):
            out.write(checkpoint_json(checkpoint) + "\n")
        for record in _records_in_storage_order(session):
            out.write(record_json(record) + "\n")
            count += 1
    return count


def verify_database(path: str | Path, public_keys: Mapping[str, bytes]) -> VerificationReport:
    """Verify the audit log of the database at ``path`` with the audit public keys (by key version name)."""
    verify_signature = checkpoint_verifier(public_keys)
    with Database.open(path) as db:
        return verify_stored(db, verify_signature)


def export_jsonl(path: str | Path, out: TextIO) -> int:
    """Export the audit log of the database at ``path`` as JSON lines to ``out``; the record count."""
    with Database.open(path) as db:
        return write_export(db, out)


# --- The log ----------------------------------------------------------------------------------------------


class _Pending:
    __slots__ = ("done", "error", "event", "record")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.done = threading.Event()
        self.error: KmsError | None = None
        self.record: AuditRecord | None = None


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SqliteAuditLog:
    """The service's audit log (see the module documentation). Thread-safe; one per database."""

    def __init__(
        self,
        db: Database,
        signer: CheckpointSigner | None = None,
        *,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
        retry_delay: float = 5.0,
        max_batch: int = 512,
        max_wait: float = 0.0,
        max_queue: int = 8192,
        enqueue_timeout: float = 5.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if min(checkpoint_every, max_batch, max_queue) < 1 or min(checkpoint_interval, retry_delay) <= 0:
            raise ValueError("checkpoint_every, max_batch, max_queue and the intervals must be positive")
        if max_wait < 0 or enqueue_timeout < 0:
            raise ValueError("max_wait and enqueue_timeout must not be negative")
        self._db = db
        self._signer = signer
        self._every = checkpoint_every
        self._interval = checkpoint_interval
        self._retry_delay = retry_delay
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._max_queue = max_queue
        self._enqueue_timeout = enqueue_timeout
        self._clock = clock
        with db.snapshot() as session:
            head = _stored_head(session)
            checkpointed = _last_checkpoint(session)

        # Appends: the queue and its conditions.
        self._queue: deque[_Pending] = deque()
        self._closed = False
        queue_lock = threading.Lock()
        self._not_empty = threading.Condition(queue_lock)
        self._not_full = threading.Condition(queue_lock)

        # Progress: the committed head and the checkpoint state, shared by the writer and the checkpointer.
        self._progress = threading.Condition()
        self._head = head
        self._checkpointed = checkpointed
        unsigned = head.count > checkpointed
        self._unsigned_since: float | None = time.monotonic() - checkpoint_interval if unsigned else None
        self._retry_at = 0.0
        self._stopping = False
        self._last_error: KmsError | None = None
        self._signing = threading.Lock()

        self._writer = threading.Thread(target=self._write_batches, name="audit-log-writer", daemon=True)
        self._writer.start()
        self._checkpointer: threading.Thread | None = None
        if signer is not None:
            self._checkpointer = threading.Thread(
                target=self._make_checkpoints, name="audit-log-checkpointer", daemon=True
            )
            self._checkpointer.start()

    # -- appending ---------------------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditRecord:
        """Record one event; return the stored record once it is committed durably."""
        pending = _Pending(event)
        with self._not_full:
            has_room = self._not_full.wait_for(
                lambda: self._closed or len(self._queue) < self._max_queue, self._enqueue_timeout
            )
            if self._closed:
                raise StorageFailure("the audit log is closed")
            if not has_room:
                raise LimitExceeded("too many calls are waiting to be recorded in the audit log; retry later")
            self._queue.append(pending)
            self._not_empty.notify()
        pending.done.wait()
        if pending.error is not None:
            raise type(pending.error)(*pending.error.args) from pending.error
        assert pending.record is not None
        return pending.record

    def head(self) -> ChainHead:
        """The last committed record's number and hash."""
        with self._progress:
            return self._head

    @property
    def last_checkpoint_error(self) -> KmsError | None:
        """Why the last checkpoint attempt failed, or None if it succeeded (or none was due yet)."""
        with self._progress:
            return self._last_error

    def close(self) -> None:
        """Refuse new events, commit the queued ones, sign a final checkpoint, stop. Idempotent.

        Close the log before its ``Database``. A failed final checkpoint is logged, not raised.
        """
        with self._not_empty:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
        self._writer.join()
        if self._checkpointer is None:
            return
        with self._progress:
            self._stopping = True
            self._progress.notify_all()
        self._checkpointer.join()
        try:
            self.checkpoint()
        except KmsError as e:
            _log.warning("the final audit checkpoint could not be made: %s", e)

    def _write_batches(self) -> None:
        while batch := self._next_batch():
            self._commit(batch)

    def _next_batch(self) -> list[_Pending]:
        """Wait for events; take up to ``max_batch`` (waiting ``max_wait`` for more). Empty: stop."""
        with self._not_empty:
            self._not_empty.wait_for(lambda: self._queue or self._closed)
            deadline = time.monotonic() + self._max_wait
            while len(self._queue) < self._max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._not_empty.wait(remaining):
                    break
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            self._not_full.notify_all()
        return batch

    def _commit(self, batch: list[_Pending]) -> None:
        error: KmsError | None = None
        records: list[AuditRecord] = []
        head = self._head  # only this thread changes it
        try:
            with self._db.transaction() as session:
                stored = _stored_head(session)
                if stored != head:
                    head = _adopt(session, head, stored)
                for pending in batch:
                    records.append(AuditRecord.chained(head.count + 1, head.hash, pending.event))
                    head = ChainHead(records[-1].seq, records[-1].hash)
                session.execute_many(_INSERT_RECORD, [_record_row(r) for r in records])
        except KmsError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - the writer must survive; every caller gets a domain error
            error = StorageFailure("the call could not be recorded in the audit log")
            error.__cause__ = e
        if error is None:
            with self._progress:
                self._head = head
                if self._unsigned_since is None:
                    self._unsigned_since = time.monotonic()
                self._progress.notify_all()
        for index, pending in enumerate(batch):
            pending.error = error
            pending.record = None if error else records[index]
            pending.done.set()

    # -- checkpoints -------------------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint | None:
        """Sign and store a checkpoint of the committed head now; None if it is signed already.

        Raises what the signer or the database raised (``HsmUnavailable``, ``StorageFailure``, ...), and
        ``FailedPrecondition`` if the log has no signer.
        """
        if self._signer is None:
            raise FailedPrecondition("the audit log has no checkpoint signer")
        with self._signing:
            with self._progress:
                head, started = self._head, time.monotonic()
                if head.count <= self._checkpointed:
                    return None
            try:
                checkpoint = sign_checkpoint(head, self._clock(), self._signer)
                with self._db.transaction() as session:
                    session.execute(
                        _INSERT_CHECKPOINT,
                        [
                            checkpoint.count,
                            checkpoint.head_hash,
                            time_text(checkpoint.time),
                            checkpoint.key_version,
                            checkpoint.signature,
                        ],
                    )
            except BaseException as e:
                with self._progress:
                    self._retry_at = time.monotonic() + self._retry_delay
                    self._last_error = e if isinstance(e, KmsError) else KmsError("unexpected failure")
                raise
            with self._progress:
                self._checkpointed = head.count
                self._last_error = None
                self._unsigned_since = started if self._head.count > head.count else None
            return checkpoint

    def _make_checkpoints(self) -> None:
        while self._wait_until_checkpoint_due():
            try:
                self.checkpoint()
            except KmsError as e:
                _log.warning("an audit checkpoint could not be made, retrying later: %s", e)
            except Exception:  # noqa: BLE001 - logged with its traceback; the checkpointer must survive
                _log.exception("an audit checkpoint failed unexpectedly; retrying later")

    def _wait_until_checkpoint_due(self) -> bool:
        """Block until a checkpoint is due (True) or the log is closing (False)."""
        with self._progress:
            while not self._stopping:
                unsigned = self._head.count - self._checkpointed
                if unsigned <= 0:
                    self._progress.wait()
                    continue
                now = time.monotonic()
                if now < self._retry_at:
                    self._progress.wait(self._retry_at - now)
                    continue
                assert self._unsigned_since is not None
                wait = self._unsigned_since + self._interval - now
                if unsigned >= self._every or wait <= 0:
                    return True
                self._progress.wait(wait)
            return False
