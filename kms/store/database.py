"""The SQLite database behind the repositories: connections, durability settings, migrations, errors.

Opening
-------
``Database.open(path)`` opens (creating if needed) one SQLite file through ``sqlite_utils.Database``, brings
its schema up to date and returns; nothing happens at import time. ``close()`` closes every connection.

Durability
----------
Every connection runs with ``journal_mode=WAL`` (checked: a file system where WAL cannot work is refused),
``synchronous=FULL`` (the WAL is fsynced at every commit, so a commit that returned survives a power loss,
not only a crash of the process), ``foreign_keys=ON`` and a ``busy_timeout``. A change is acknowledged only
after ``transaction()`` returned, that is after its ``COMMIT``.

Threading model
---------------
One process holds one ``Database``; the gRPC server calls it from many threads.

- Writes go through ONE writer connection guarded by a lock. ``transaction()`` takes the lock, runs
  ``BEGIN IMMEDIATE``, yields a ``Session``, and runs ``COMMIT`` only if the block exits cleanly (otherwise
  ``ROLLBACK``). SQLite admits one writer at a time anyway; queuing writers on a Python lock instead of in
  SQLite's busy handler (which sleeps and polls) keeps waiting fair and short. ``BEGIN IMMEDIATE`` takes the
  file's write lock at the start, so a check-then-insert inside one transaction is race-free against other
  threads *and* other processes (those wait up to ``busy_timeout``). The lock is not reentrant: opening a
  transaction inside another on the same thread raises ``RuntimeError`` instead of deadlocking.
- Reads go through ``snapshot()``: a connection from a bounded pool of read-only (``query_only``)
  connections, inside one read transaction, so a read of several queries sees one consistent state. In WAL
  mode readers neither block nor are blocked by the writer, so long reads stay off the write path.
- Connections are made with ``check_same_thread=False`` (the sqlite3 module is built thread-safe here) and
  each is used by one thread at a time: the writer under its lock, a reader while checked out of the pool.

Nothing read from the database is cached, so several processes may share the file.

Schema versions
---------------
``PRAGMA user_version`` holds the schema version; ``PRAGMA application_id`` marks the file as ours. The
ordered list ``MIGRATIONS`` holds every change since the first release; each is applied in its own
transaction together with the new ``user_version`` and a row in ``schema_migrations``, so a failed
migration leaves the previous version intact. A database whose version is higher than the last migration
this code knows is refused with ``SchemaTooNew``; a non-empty file that is not ours is refused too.
Migrations must never be edited once released: append a new one. A migration that rebuilds a table must
keep foreign keys consistent itself (``PRAGMA foreign_keys`` cannot change inside a transaction).

Errors
------
``sqlite3`` exceptions are translated where they leave this package, in one place (``_translated``), into
``kms.domain.errors`` exceptions (or ``StorageFailure``, a ``KmsError``), with the cause chained and no SQL
in the message. Repositories check their own constraints first to give precise messages.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self, TypeVar

import sqlite_utils

from kms.domain.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    KmsError,
    Unavailable,
)


class StorageFailure(Unavailable):
    """The database or the file store could not be read or written (I/O error, disk full, busy for too
    long, closed). The operation may succeed if retried later."""


class SchemaTooNew(FailedPrecondition):
    """The database was written by a newer release of the service than this one."""


APPLICATION_ID = 0x4B4D5331  # "KMS1" in ASCII: PRAGMA application_id of our files.
MIN_SQLITE_VERSION = (3, 37, 0)  # STRICT tables.

Params = Sequence[object] | dict[str, object]
E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


# --- Values -----------------------------------------------------------------------------------------------


def timestamp_text(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds, fixed width, e.g. ``2024-05-01T12:00:00.000001Z`` (sorts as text)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidArgument("timestamps must carry a time zone")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_timestamp(text: str) -> datetime:
    """The inverse of ``timestamp_text``: an aware datetime in UTC. ``ValueError`` if malformed."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError("timestamp without a time zone")
    return moment.astimezone(UTC)


class Row:
    """One result row with typed accessors. A value of the wrong type means the file was altered: DataLoss."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, object]) -> None:
        self._values = values

    def _get(self, name: str, kind: type[T]) -> T:
        value = self._values[name]
        if not isinstance(value, kind):
            raise DataLoss(f"stored data is unreadable: {name} is not {kind.__name__}")
        return value

    def text(self, name: str) -> str:
        return self._get(name, str)

    def integer(self, name: str) -> int:
        return self._get(name, int)

    def optional_text(self, name: str) -> str | None:
        return None if self._values[name] is None else self.text(name)

    def optional_integer(self, name: str) -> int | None:
        return None if self._values[name] is None else self.integer(name)

    def blob(self, name: str) -> bytes:
        return self._get(name, bytes)

    def optional_blob(self, name: str) -> bytes | None:
        return None if self._values[name] is None else self.blob(name)

    def timestamp(self, name: str) -> datetime:
        try:
            return parse_timestamp(self.text(name))
        except ValueError as e:
            raise DataLoss(f"stored data is unreadable: {name} is not a timestamp") from e

    def enum(self, name: str, kind: type[E]) -> E:
        try:
            return kind(self.text(name))
        except ValueError as e:
            raise DataLoss(f"stored data is unreadable: unknown {name} {self._values[name]!r}") from e


class Session:
    """Typed access to one connection inside a transaction (``Database.transaction``/``snapshot``)."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self._db = db

    def rows(self, sql: str, params: Params = ()) -> list[Row]:
        return [Row(values) for values in self._db.query(sql, params)]

    def row(self, sql: str, params: Params = ()) -> Row | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; return the number of rows it changed."""
        return self._db.execute(sql, params).rowcount

    def execute_many(self, sql: str, params: Iterable[Sequence[object]]) -> None:
        self._db.conn.executemany(sql, params)

    def script(self, sql: str) -> None:
        """Run several statements (inside the current transaction)."""
        self._db.executescript(sql)


# --- Migrations -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """Schema change number ``version``: SQL statements, or a function given the open transaction."""

    version: int
    description: str
    step: str | Callable[[Session], None]


_INITIAL_SCHEMA = """
CREATE TABLE keys (
    key_id          TEXT PRIMARY KEY,
    product         TEXT NOT NULL,
    purpose         TEXT NOT NULL,
    algorithm       TEXT NOT NULL,
    sbv2_slot       INTEGER CHECK (sbv2_slot BETWEEN 0 AND 2),
    primary_version INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    UNIQUE (product, sbv2_slot)  -- NULLs are distinct: only Secure Boot V2 keys compete for a slot
) STRICT;

CREATE TABLE key_versions (
    key_id         TEXT NOT NULL REFERENCES keys (key_id),
    version        INTEGER NOT NULL CHECK (version >= 1),
    algorithm      TEXT NOT NULL,
    state          TEXT NOT NULL,
    hsm_id         BLOB NOT NULL UNIQUE,  -- one HSM key pair backs one version only
    public_key_der BLOB NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (key_id, version)
) STRICT;

CREATE TABLE releases (
    output_sha256  BLOB PRIMARY KEY CHECK (length(output_sha256) = 32),
    product        TEXT NOT NULL,
    chip           TEXT NOT NULL,
    version        TEXT NOT NULL,
    secure_version INTEGER NOT NULL CHECK (secure_version >= 0),
    project_name   TEXT NOT NULL,
    input_sha256   BLOB NOT NULL CHECK (length(input_sha256) = 32),
    output_size    INTEGER NOT NULL CHECK (output_size >= 0),
    key_versions   TEXT NOT NULL,  -- canonical JSON array of key version names, in signing order
    signed_by      TEXT NOT NULL,
    created_at     TEXT NOT NULL
) STRICT;
CREATE UNIQUE INDEX releases_by_input ON releases (product, input_sha256, key_versions);

CREATE TABLE product_floors (
    product        TEXT PRIMARY KEY,
    secure_version INTEGER NOT NULL CHECK (secure_version >= 0)
) STRICT;

CREATE TABLE signatures (
    id          INTEGER PRIMARY KEY,
    caller      TEXT NOT NULL,
    operation   TEXT NOT NULL,
    key_version TEXT NOT NULL,
    digest      BLOB NOT NULL,
    subject     TEXT NOT NULL,
    created_at  TEXT NOT NULL
) STRICT;
CREATE INDEX signatures_by_key_version ON signatures (key_version, id);
"""

_DEVICES_SCHEMA = """
CREATE TABLE devices (
    device_id        TEXT PRIMARY KEY,
    product          TEXT NOT NULL,
    chip             TEXT NOT NULL,
    state            TEXT NOT NULL,
    kek_key_id       TEXT NOT NULL,
    kek_version      INTEGER NOT NULL,
    wrap_mechanism   TEXT NOT NULL,  -- names the wrap exactly, e.g. "CKM_AES_KEY_WRAP_PAD(0x210A)"
    wrapped_secret   BLOB NOT NULL,
    fingerprint      BLOB NOT NULL CHECK (length(fingerprint) = 32),
    ecies_public_key BLOB CHECK (ecies_public_key IS NULL OR length(ecies_public_key) = 64),
    registered_by    TEXT NOT NULL,
    registered_at    TEXT NOT NULL,
    revoked_at       TEXT
) STRICT;
CREATE INDEX devices_by_kek ON devices (kek_key_id, kek_version);
CREATE INDEX devices_by_product ON devices (product);

-- ECDSA is randomized: the manifest signature of a sealed payload is made once and reused, so the same
-- (device, release, segment size) always gives byte-identical payloads (resume, caching).
CREATE TABLE payload_signatures (
    device_id    TEXT NOT NULL REFERENCES devices (device_id),
    release      BLOB NOT NULL REFERENCES releases (output_sha256),
    segment_size INTEGER NOT NULL,
    key_version  TEXT NOT NULL,
    signature    BLOB NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (device_id, release, segment_size, key_version)
) STRICT, WITHOUT ROWID;
"""

_LIFECYCLE_SCHEMA = """
-- Key version lifecycle (kms.domain.lifecycle, kms.store.keys).
ALTER TABLE key_versions ADD COLUMN destroy_after TEXT;          -- due time while destroy-scheduled
ALTER TABLE key_versions ADD COLUMN material_destroyed_at TEXT;  -- HSM material confirmed gone (destroyed)
ALTER TABLE keys ADD COLUMN rotation_period_seconds INTEGER
    CHECK (rotation_period_seconds IS NULL OR rotation_period_seconds > 0);
ALTER TABLE keys ADD COLUMN next_rotation_at TEXT;               -- NULL: rotated on demand only
CREATE INDEX key_versions_by_destroy_after ON key_versions (destroy_after) WHERE destroy_after IS NOT NULL;
CREATE INDEX keys_by_next_rotation ON keys (next_rotation_at) WHERE next_rotation_at IS NOT NULL;

CREATE TABLE key_transitions (
    id            INTEGER PRIMARY KEY,
    key_id        TEXT NOT NULL,
    version       INTEGER NOT NULL,
    event         TEXT NOT NULL,
    from_state    TEXT,  -- NULL when the version was created
    to_state      TEXT NOT NULL,
    actor         TEXT NOT NULL,
    at            TEXT NOT NULL,
    destroy_after TEXT,  -- set for "destroy-scheduled"
    FOREIGN KEY (key_id, version) REFERENCES key_versions (key_id, version)
) STRICT;
CREATE INDEX key_transitions_by_version ON key_transitions (key_id, version, id);
"""

_AUDIT_SCHEMA = """
-- The audit log (kms.domain.audit documents the record hash and the checkpoint note; kms.store.audit writes).
-- Verification reads records in id order (insertion order); seq is the record's own number, inside its
-- hash, so a moved row shows as out of order and a renumbered one as edited. Text columns hold exactly the
-- strings that were hashed; time is YYYY-MM-DDTHH:MM:SS.ffffffZ.
CREATE TABLE audit_records (
    id          INTEGER PRIMARY KEY,
    seq         INTEGER NOT NULL UNIQUE CHECK (seq >= 1),
    time        TEXT NOT NULL,
    caller      TEXT NOT NULL,
    role        TEXT NOT NULL,
    operation   TEXT NOT NULL,
    product     TEXT NOT NULL,
    resource    TEXT NOT NULL,
    key_version TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    prev_hash   BLOB NOT NULL CHECK (length(prev_hash) = 32),
    hash        BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;

-- Signed checkpoints: records 1..count end with head_hash; signature by the audit key version named.
CREATE TABLE audit_checkpoints (
    count       INTEGER PRIMARY KEY CHECK (count >= 1),
    head_hash   BLOB NOT NULL CHECK (length(head_hash) = 32),
    time        TEXT NOT NULL,
    key_version TEXT NOT NULL,
    signature   BLOB NOT NULL
) STRICT;
"""

_KEK_ROTATION_SCHEMA = """
-- KEK rotation jobs (kms.domain.kek_rotation, kms.store.kek_rotations). A job moves every device secret of
-- the key wrapped under a version below to_version; rewrapped moves in the same transaction as the rows.
CREATE TABLE kek_rotations (
    kek_key_id   TEXT NOT NULL,
    to_version   INTEGER NOT NULL,
    from_version INTEGER NOT NULL CHECK (from_version < to_version),
    product      TEXT NOT NULL,
    started_by   TEXT NOT NULL,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    rewrapped    INTEGER NOT NULL DEFAULT 0 CHECK (rewrapped >= 0),
    PRIMARY KEY (kek_key_id, to_version),
    FOREIGN KEY (kek_key_id, to_version) REFERENCES key_versions (key_id, version)
) STRICT;
CREATE UNIQUE INDEX kek_rotations_one_running ON kek_rotations (kek_key_id) WHERE finished_at IS NULL;
"""

_APPROVALS_SCHEMA = """
-- Dual control (kms.domain.approvals, kms.store.approvals): requests for acts that need M officers'
-- approval, and the officers' votes (one per officer and request: the primary key refuses a second).
CREATE TABLE approval_requests (
    id          TEXT PRIMARY KEY,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    parameters  TEXT NOT NULL,  -- canonical JSON object of strings
    requester   TEXT NOT NULL,
    required    INTEGER NOT NULL CHECK (required >= 1),
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    executed_at TEXT,           -- set once, by a compare-and-set (NULL: not executed)
    executed_by TEXT
) STRICT;
CREATE INDEX approval_requests_by_time ON approval_requests (created_at, id);

CREATE TABLE approval_votes (
    request_id TEXT NOT NULL REFERENCES approval_requests (id),
    officer    TEXT NOT NULL,
    approve    INTEGER NOT NULL CHECK (approve IN (0, 1)),
    reason     TEXT NOT NULL,
    at         TEXT NOT NULL,
    PRIMARY KEY (request_id, officer)
) STRICT, WITHOUT ROWID;
"""

_SBV2_SLOTS_SCHEMA = """
-- Secure Boot V2 slot revocations (kms.store.sbv2_slots): a revoked slot stays revoked, as the eFuse does.
CREATE TABLE sbv2_slot_revocations (
    product     TEXT NOT NULL,
    slot        INTEGER NOT NULL CHECK (slot BETWEEN 0 AND 2),
    key_id      TEXT NOT NULL REFERENCES keys (key_id),
    revoked_at  TEXT NOT NULL,
    revoked_by  TEXT NOT NULL,
    approval_id TEXT NOT NULL,
    PRIMARY KEY (product, slot)
) STRICT, WITHOUT ROWID;
"""

_MANIFEST_ROLLOVER_SCHEMA = """
-- OTA manifest key rollover statements (kms.store.rollovers): version to_version's public key signed by
-- from_version, made when to_version was created.
CREATE TABLE manifest_key_rollovers (
    key_id       TEXT NOT NULL,
    from_version INTEGER NOT NULL,
    to_version   INTEGER NOT NULL CHECK (from_version < to_version),
    statement    BLOB NOT NULL,
    created_at   TEXT NOT NULL,
    PRIMARY KEY (key_id, to_version),
    FOREIGN KEY (key_id, to_version) REFERENCES key_versions (key_id, version)
) STRICT, WITHOUT ROWID;
"""

_FLOOR_AND_REPROVISION_SCHEMA = """
-- Anti-rollback floor lowerings under dual control (kms.store.releases).
CREATE TABLE floor_lowerings (
    id                  INTEGER PRIMARY KEY,
    product             TEXT NOT NULL,
    from_secure_version INTEGER NOT NULL,
    to_secure_version   INTEGER NOT NULL CHECK (to_secure_version < from_secure_version),
    at                  TEXT NOT NULL,
    officer             TEXT NOT NULL,
    approval_id         TEXT NOT NULL
) STRICT;
CREATE INDEX floor_lowerings_by_product ON floor_lowerings (product, id);
-- Device re-provisioning (kms.store.devices): an executed request opens a window for one new secret.
ALTER TABLE devices ADD COLUMN reprovision_until TEXT;
ALTER TABLE devices ADD COLUMN reprovision_request TEXT;
ALTER TABLE devices ADD COLUMN secret_generation INTEGER NOT NULL DEFAULT 1;
"""

_POLICY_SCHEMA = """
-- Authorization policy versions under dual control (kms.store.policy); version 0 is the [policy] file.
CREATE TABLE policy_versions (
    version     INTEGER PRIMARY KEY CHECK (version >= 1),
    text        TEXT NOT NULL,
    sha256      BLOB NOT NULL,
    created_at  TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    approval_id TEXT NOT NULL
) STRICT;
-- Proposed policy texts, by SHA-256 (an approval request names its text by hash).
CREATE TABLE policy_drafts (
    sha256     BLOB PRIMARY KEY,
    text       TEXT NOT NULL,
    created_at TEXT NOT NULL
) STRICT, WITHOUT ROWID;
"""

_REPROVISIONED_BY_SCHEMA = """
-- Who installed each device's current secret (kms.store.devices): registered_by/at stay the first
-- registration; a re-provisioning sets these with the secret it stores, and the approval request id that
-- admitted it. A first secret is the registrar's. Secrets re-provisioned before this migration keep NULL:
-- who registered them was not recorded.
ALTER TABLE devices ADD COLUMN secret_registered_by TEXT;
ALTER TABLE devices ADD COLUMN secret_registered_at TEXT;
ALTER TABLE devices ADD COLUMN reprovisioned_under TEXT;
UPDATE devices SET secret_registered_by = registered_by, secret_registered_at = registered_at
WHERE secret_generation = 1;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "keys, key versions, releases, product floors, signatures", _INITIAL_SCHEMA),
    Migration(2, "device registry and payload manifest signatures", _DEVICES_SCHEMA),
    Migration(3, "key lifecycle: transitions, destroy schedule, rotation period", _LIFECYCLE_SCHEMA),
    Migration(4, "audit log and checkpoints", _AUDIT_SCHEMA),
    Migration(5, "KEK rotation jobs", _KEK_ROTATION_SCHEMA),
    Migration(6, "dual control: approval requests and votes", _APPROVALS_SCHEMA),
    Migration(7, "Secure Boot V2 slot revocations", _SBV2_SLOTS_SCHEMA),
    Migration(8, "OTA manifest key rollover statements", _MANIFEST_ROLLOVER_SCHEMA),
    Migration(9, "anti-rollback floor lowerings and device re-provisioning", _FLOOR_AND_REPROVISION_SCHEMA),
    Migration(10, "authorization policy versions", _POLICY_SCHEMA),
    Migration(11, "who registered each device's current secret", _REPROVISIONED_BY_SCHEMA),
)

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at  TEXT NOT NULL
) STRICT
"""


def _check_sequence(migrations: Sequence[Migration]) -> None:
    expected = list(range(1, len(migrations) + 1))
    if [m.version for m in migrations] != expected:
        raise ValueError("migrations must be numbered 1, 2, 3, ... in order")


# --- Errors -----------------------------------------------------------------------------------------------


def _domain_error(error: sqlite3.Error) -> KmsError:
    name = getattr(error, "sqlite_errorname", "")
    if name in ("SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"):
        return AlreadyExists("the record conflicts with one already stored")
    if name.startswith("SQLITE_CONSTRAINT"):
        return InvalidArgument("the record breaks a rule of the stored data")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return DataLoss("the database file is corrupted")
    if name == "SQLITE_FULL":
        return StorageFailure("the database cannot grow: the disk is full")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StorageFailure("the database is busy; retry later")
    if isinstance(error, sqlite3.ProgrammingError) and "closed" in str(error):
        return StorageFailure("the database is closed")
    return StorageFailure("the database could not be read or written")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise _domain_error(e) from e


def _end_transaction(db: sqlite_utils.Database) -> None:
    """Roll back whatever is still open (nothing after a COMMIT); a failure here must not hide the cause."""
    with contextlib.suppress(sqlite3.Error):
        if db.conn.in_transaction:
            db.conn.execute("ROLLBACK")


# --- Connections ------------------------------------------------------------------------------------------


def _connect(path: Path, busy_timeout: float, *, read_only: bool) -> sqlite_utils.Database:
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout,
        isolation_level=None,  # no implicit transactions: every transaction is an explicit BEGIN
        check_same_thread=False,  # see "Threading model": one thread at a time, enforced by us
    )
    try:
        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA trusted_schema = OFF")
        if read_only:
            db.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return db


class _ReaderPool:
    """Up to ``size`` read-only connections, made on demand and reused (last in, first out)."""

    def __init__(self, connect: Callable[[], sqlite_utils.Database], size: int, timeout: float) -> None:
        self._connect = connect
        self._size = size
        self._timeout = timeout
        self._idle: list[sqlite_utils.Database] = []
        self._count = 0
        self._closed = False
        self._changed = threading.Condition()

    def acquire(self) -> sqlite_utils.Database:
        deadline = time.monotonic() + self._timeout
        with self._changed:
            while not self._idle and self._count >= self._size and not self._closed:
                if not self._changed.wait(deadline - time.monotonic()):
                    raise StorageFailure("too many concurrent reads of the database; retry later")
            if self._closed:
                raise StorageFailure("the database is closed")
            if self._idle:
                return self._idle.pop()
            self._count += 1
        try:
            with _translated():
                return self._connect()
        except BaseException:
            self._discard(None)
            raise

    def release(self, db: sqlite_utils.Database) -> None:
        with self._changed:
            if not self._closed and not db.conn.in_transaction:
                self._idle.append(db)
                self._changed.notify()
                return
        self._discard(db)

    def _discard(self, db: sqlite_utils.Database | None) -> None:
        if db is not None:
            db.close()
        with self._changed:
            self._count -= 1
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._changed.notify_all()
        for db in idle:
            db.close()


# --- The database -----------------------------------------------------------------------------------------


class Database:
    """One SQLite file, opened with ``Database.open``. Safe to share between threads (see module doc)."""

    def __init__(
        self, path: Path, writer: sqlite_utils.Database, busy_timeout: float, max_readers: int
    ) -> None:
        """Use ``Database.open``."""
        self._path = path
        self._writer: sqlite_utils.Database | None = writer
        self._write_lock = threading.RLock()  # reentrant only so that nesting is detected, not deadlocked
        self._readers = _ReaderPool(
            lambda: _connect(path, busy_timeout, read_only=True), max_readers, busy_timeout
        )

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        migrations: Sequence[Migration] = MIGRATIONS,
        busy_timeout: float = 5.0,
        max_readers: int = 8,
    ) -> Database:
        """Open or create the database at ``path`` and apply pending migrations.

        Raises ``SchemaTooNew`` if the file was written by a newer release, ``FailedPrecondition`` if it is
        not a KMS database or WAL is impossible there, ``StorageFailure`` if it cannot be opened.
        """
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise FailedPrecondition(
                f"SQLite {sqlite3.sqlite_version} is too old; {'.'.join(map(str, MIN_SQLITE_VERSION))} "
                "or newer is needed"
            )
        _check_sequence(migrations)
        path = Path(path)
        try:
            writer = _connect(path, busy_timeout, read_only=False)
        except sqlite3.Error as e:
            raise StorageFailure(f"cannot open the database {path}: {e}") from e
        database = cls(path, writer, busy_timeout, max_readers)
        try:
            with _translated():
                mode = next(writer.query("PRAGMA journal_mode = WAL"))["journal_mode"]
            if mode != "wal":
                raise FailedPrecondition(f"the database {path} cannot use write-ahead logging (got {mode!r})")
            database._migrate(migrations)
        except BaseException:
            database.close()
            raise
        return database

    @property
    def path(self) -> Path:
        return self._path

    @property
    def schema_version(self) -> int:
        with self.snapshot() as session:
            return _header(session, "user_version")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """The write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT`` on a clean exit, ``ROLLBACK`` otherwise.

        The commit is durable when the block exits. Keep the block short: it holds the only writer.
        """
        with self._write_lock:
            writer = self._writer
            if writer is None:
                raise StorageFailure("the database is closed")
            if writer.conn.in_transaction:
                raise RuntimeError("a write transaction is already open on this thread")
            with _translated():
                writer.execute("BEGIN IMMEDIATE")
                try:
                    yield Session(writer)
                    writer.execute("COMMIT")
                finally:
                    _end_transaction(writer)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read transaction on a pooled read-only connection: one consistent view of committed data."""
        reader = self._readers.acquire()
        try:
            with _translated():
                reader.execute("BEGIN")
                try:
                    yield Session(reader)
                finally:
                    _end_transaction(reader)
        finally:
            self._readers.release(reader)

    def close(self) -> None:
        """Close every connection. Idempotent. Stop users (e.g. ``SqliteSignatureLog``) first."""
        self._readers.close()
        with self._write_lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        """Apply the migrations after the file's version, each in its own transaction (numbered 1..n)."""
        latest = len(migrations)
        while True:
            with self.transaction() as session:
                current = _header(session, "user_version")
                if current > latest:
                    raise SchemaTooNew(
                        f"the database {self._path} has schema version {current}, but this release of the "
                        f"service knows versions up to {latest}: run a newer release, or restore a backup "
                        "made by this one"
                    )
                if current == latest:
                    return
                if current == 0:
                    _claim(session, self._path)
                migration = migrations[current]
                session.execute(_MIGRATIONS_TABLE)
                if isinstance(migration.step, str):
                    session.script(migration.step)
                else:
                    migration.step(session)
                session.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                    [migration.version, migration.description, timestamp_text(datetime.now(UTC))],
                )
                session.execute(f"PRAGMA user_version = {migration.version:d}")


def _header(session: Session, pragma: str) -> int:
    row = session.row(f"PRAGMA {pragma}")
    assert row is not None
    return row.integer(pragma)


def _claim(session: Session, path: Path) -> None:
    """Refuse a file that holds someone else's data; mark an empty one as ours."""
    application_id = _header(session, "application_id")
    has_tables = session.row("SELECT 1 FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'") is not None
    if application_id not in (0, APPLICATION_ID) or (application_id == 0 and has_tables):
        raise FailedPrecondition(f"{path} is not a key management service database")
    session.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
