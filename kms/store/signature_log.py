"""``SqliteSignatureLog``: the durable record of every key use, written with group commit.

Table (created by migration 1)::

    signatures  id INTEGER PK (insertion order), caller, operation, key_version, digest BLOB, subject,
                created_at (ISO-8601 UTC text); index on (key_version, id).

Group commit
------------
``append`` encodes the record, puts it in a bounded queue and blocks until a background writer thread has
committed a transaction containing it. The writer takes everything queued (up to ``max_batch`` records),
optionally waits up to ``max_wait`` seconds for the batch to fill, and inserts the batch in ONE transaction
(``synchronous=FULL``: one WAL fsync per batch), then wakes the batch's callers. Records arriving while a
batch commits form the next batch, so batches grow with the load by themselves; ``max_wait`` defaults to 0
(no added latency). An ``append`` therefore returns after at most about two commits plus ``max_wait``,
unless the queue is full.

- ``max_queue`` bounds the records waiting; an ``append`` that finds the queue full waits up to
  ``enqueue_timeout`` seconds for room, then raises ``LimitExceeded`` (the signature must then not be
  released).
- If a batch cannot be committed, every caller in it gets the error (a fresh exception of the same
  ``KmsError`` class per caller, chained to the original) and nothing of the batch is stored; the writer
  goes on with the next batch.
- ``close`` refuses new records, lets the writer commit everything already queued, and joins it. Close the
  log before its ``Database``. The writer thread is a daemon: a process that exits without ``close`` loses
  only records whose ``append`` had not returned, i.e. unacknowledged ones.

The writer shares the ``Database``'s single writer connection (``Database.transaction``), so it queues
behind release commits on a lock, not in SQLite's busy handler. Consequently ``append`` must never be called
inside a ``Database.transaction`` block: it would wait for a writer that waits for that block.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

from kms.domain.errors import KmsError, LimitExceeded
from kms.domain.releases import SignatureRecord
from kms.store.database import Database, Session, StorageFailure, timestamp_text

_INSERT = (
    "INSERT INTO signatures (caller, operation, key_version, digest, subject, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


def _encode(record: SignatureRecord) -> tuple[object, ...]:
    return (
        record.caller,
        record.operation,
        record.key_version,
        record.digest,
        record.subject,
        timestamp_text(record.created_at),
    )


def insert_signatures(session: Session, records: Sequence[SignatureRecord]) -> None:
    """Insert key-use records inside the caller's transaction (used by the release repository)."""
    session.execute_many(_INSERT, [_encode(r) for r in records])


class _Pending:
    __slots__ = ("done", "error", "row")

    def __init__(self, row: tuple[object, ...]) -> None:
        self.row = row
        self.done = threading.Event()
        self.error: KmsError | None = None


class SqliteSignatureLog:
    """``kms.domain.ports.SignatureLog`` with group commit (see the module documentation)."""

    def __init__(
        self,
        db: Database,
        *,
        max_batch: int = 512,
        max_wait: float = 0.0,
        max_queue: int = 8192,
        enqueue_timeout: float = 5.0,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait < 0 or enqueue_timeout < 0:
            raise ValueError(
                "max_batch and max_queue must be positive, max_wait and enqueue_timeout not negative"
            )
        self._db = db
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._max_queue = max_queue
        self._enqueue_timeout = enqueue_timeout
        self._queue: deque[_Pending] = deque()
        self._closed = False
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._not_full = threading.Condition(lock)
        self._writer = threading.Thread(target=self._run, name="signature-log-writer", daemon=True)
        self._writer.start()

    def append(self, record: SignatureRecord) -> None:
        """Record one key use; return once it is committed durably. Raises what the commit raised."""
        pending = _Pending(_encode(record))
        with self._not_full:
            has_room = self._not_full.wait_for(
                lambda: self._closed or len(self._queue) < self._max_queue, self._enqueue_timeout
            )
            if self._closed:
                raise StorageFailure("the key-use log is closed")
            if not has_room:
                raise LimitExceeded("too many key uses are waiting to be recorded; retry later")
            self._queue.append(pending)
            self._not_empty.notify()
        pending.done.wait()
        if pending.error is not None:
            raise type(pending.error)(*pending.error.args) from pending.error

    def close(self) -> None:
        """Refuse new records, commit the queued ones, stop the writer. Idempotent."""
        with self._not_empty:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
        self._writer.join()

    def _run(self) -> None:
        while batch := self._next_batch():
            self._commit(batch)

    def _next_batch(self) -> list[_Pending]:
        """Wait for records; take up to ``max_batch`` (waiting ``max_wait`` for more). Empty: stop."""
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
        try:
            with self._db.transaction() as session:
                session.execute_many(_INSERT, [p.row for p in batch])
        except KmsError as e:
            error = e
        except Exception as e:  # noqa: BLE001 - the writer must survive; every caller gets a domain error
            error = StorageFailure("the key use could not be recorded")
            error.__cause__ = e
        for pending in batch:
            pending.error = error
            pending.done.set()
