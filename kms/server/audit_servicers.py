"""``AuditServicer``: the audit log, streamed to auditors and security officers in its export format.

The servicer transports lines; it never vouches for them. ``ExportAuditLog`` without a window streams what
``kms.store.audit.write_export`` writes (one database snapshot: header, checkpoints, records in stored order),
so an auditor verifies it offline with the audit public key (``kmsctl audit verify``). The export is produced
on a helper thread into a small bounded queue: memory stays flat for any log size, and a client that stops
reading stops the export. Who may call it is ``kms.server.auth.METHOD_ROLES``; like every RPC, each call is
itself recorded by ``kms.server.audit_interceptor``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import TextIO, cast

import grpc

from kms.domain.audit import GENESIS_HASH, checkpoint_json, export_header, record_json
from kms.domain.errors import InvalidArgument
from kms.domain.keys import SYSTEM_PRODUCT
from kms.server.audit_interceptor import note
from kms.server.audit_setup import AUDIT_KEY_NAME
from kms.server.errors import translate_errors
from kms.store.audit import SqliteAuditLog, read_checkpoints, read_records, write_export
from kms.store.database import Database
from kmsapi.v1 import audit_pb2, audit_pb2_grpc

MAX_WINDOW = 10_000
CHUNK_LINES = 256
CHUNK_BYTES = 256 * 1024
_QUEUE_CHUNKS = 8
_RESOURCE = "audit-log"


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit_log: SqliteAuditLog, db: Database) -> None:
        self._log = audit_log
        self._db = db

    @translate_errors
    def ExportAuditLog(  # noqa: N802 - gRPC method name
        self, request: audit_pb2.ExportAuditLogRequest, context: grpc.ServicerContext
    ) -> Iterator[audit_pb2.AuditExportChunk]:
        note(product=SYSTEM_PRODUCT, resource=_RESOURCE)
        if request.limit > MAX_WINDOW:
            raise InvalidArgument(f"limit must be 0 (everything) or 1-{MAX_WINDOW}")
        if request.from_seq <= 1 and request.limit == 0:
            lines = _full_export(self._db)
        else:
            lines = _window(self._db, max(request.from_seq, 1), request.limit)
        for chunk in _chunks(lines):
            yield audit_pb2.AuditExportChunk(lines=chunk)

    @translate_errors
    def GetAuditHead(  # noqa: N802 - gRPC method name
        self, request: audit_pb2.GetAuditHeadRequest, context: grpc.ServicerContext
    ) -> audit_pb2.AuditHead:
        note(product=SYSTEM_PRODUCT, resource=_RESOURCE)
        head = self._log.head()
        checkpoints = read_checkpoints(self._db)
        return audit_pb2.AuditHead(
            count=head.count,
            head_hash=head.hash if head.count else GENESIS_HASH,
            last_checkpoint=checkpoint_json(checkpoints[-1]) if checkpoints else "",
            audit_key=AUDIT_KEY_NAME,
        )


def add_audit(server: grpc.Server, audit_log: SqliteAuditLog, db: Database) -> AuditServicer:
    """Register the audit service on ``server``; the servicer is returned for tests."""
    servicer = AuditServicer(audit_log, db)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, server)
    return servicer


SERVICE_NAME = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name


def _window(db: Database, first: int, limit: int) -> Iterator[str]:
    """Header, the checkpoints inside the window, records ``first``.. by number (``limit`` 0: all)."""
    records = []
    remaining = limit or None
    page_start = first
    while remaining is None or remaining > 0:
        page = read_records(db, page_start, min(remaining or MAX_WINDOW, MAX_WINDOW))
        records += page
        if not page or (remaining is not None and len(page) >= remaining):
            break
        if remaining is not None:
            remaining -= len(page)
        page_start = page[-1].seq + 1
    yield export_header()
    if records:
        low, high = records[0].seq, records[-1].seq
        yield from (checkpoint_json(c) for c in read_checkpoints(db) if low <= c.count <= high)
    yield from (record_json(r) for r in records)


def _chunks(lines: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line)
        if len(chunk) >= CHUNK_LINES or size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_DONE = object()


class _Abandoned(Exception):
    """The reader of an export went away: the producer thread stops."""


class _LineSink:
    """The ``TextIO`` that ``write_export`` writes to: whole lines into a bounded queue (None ends it)."""

    def __init__(self, lines: queue.Queue[object], stop: threading.Event) -> None:
        self._lines = lines
        self._stop = stop
        self._partial = ""

    def write(self, text: str) -> int:
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            self.put(line)
        return len(text)

    def put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._lines.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise _Abandoned("the export was abandoned by its reader")


def _full_export(db: Database) -> Iterator[str]:
    """``write_export`` of ``db``, line by line, produced on a helper thread (stopped if we stop reading)."""
    lines: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_CHUNKS * CHUNK_LINES)
    stop = threading.Event()
    sink = _LineSink(lines, stop)

    def produce() -> None:
        try:
            write_export(db, cast(TextIO, sink))
            sink.put(_DONE)
        except _Abandoned:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which raises it
            with contextlib.suppress(_Abandoned):
                sink.put(e)

    thread = threading.Thread(target=produce, name="audit-export", daemon=True)
    thread.start()
    try:
        while True:
            item = lines.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, str)
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
