"""``SqliteKekRotationRepository``: KEK rotation jobs (table ``kek_rotations``, migration 5) and the batch
reads and compare-and-set rewrites of device secrets they make (``kms.store.devices``).

``record_batch`` writes the rewrapped rows and the job's counter in ONE transaction, so after a crash at
any point the counter equals the rows this job changed, and a repeated batch changes nothing (a row is
rewritten only while it still holds the version and blob that were read).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kms.domain.errors import AlreadyExists, FailedPrecondition, NotFound
from kms.domain.kek_rotation import KekRotation, Rewrap, StoredSecret
from kms.store import devices
from kms.store.database import Database, Row, Session, timestamp_text


def _from_row(row: Row) -> KekRotation:
    finished = row.optional_text("finished_at")
    return KekRotation(
        kek_key_id=row.text("kek_key_id"),
        product=row.text("product"),
        from_version=row.integer("from_version"),
        to_version=row.integer("to_version"),
        started_by=row.text("started_by"),
        started_at=row.timestamp("started_at"),
        finished_at=None if finished is None else row.timestamp("finished_at"),
        rewrapped=row.integer("rewrapped"),
    )


def _get(session: Session, kek_key_id: str, to_version: int) -> KekRotation | None:
    row = session.row(
        "SELECT * FROM kek_rotations WHERE kek_key_id = ? AND to_version = ?", [kek_key_id, to_version]
    )
    return None if row is None else _from_row(row)


class SqliteKekRotationRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def secrets_under(
        self, kek_key_id: str, kek_version: int, limit: int, after_device_id: str = ""
    ) -> list[StoredSecret]:
        with self._db.snapshot() as session:
            return devices.secrets_under(session, kek_key_id, kek_version, limit, after_device_id)

    def count_under(self, kek_key_id: str, kek_version: int) -> int:
        with self._db.snapshot() as session:
            return devices.count_under(session, kek_key_id, kek_version)

    def versions_in_use(self, kek_key_id: str) -> list[int]:
        with self._db.snapshot() as session:
            rows = session.rows(
                "SELECT DISTINCT kek_version FROM devices WHERE kek_key_id = ? ORDER BY kek_version",
                [kek_key_id],
            )
        return [r.integer("kek_version") for r in rows]

    def start(self, rotation: KekRotation) -> None:
        with self._db.transaction() as session:
            running = session.row(
                "SELECT to_version FROM kek_rotations WHERE kek_key_id = ? AND finished_at IS NULL",
                [rotation.kek_key_id],
            )
            if running is not None:
                raise FailedPrecondition(
                    f"a rotation of keys/{rotation.kek_key_id} to version {running.integer('to_version')} "
                    "is still running; wait for it to finish"
                )
            try:
                session.execute(
                    "INSERT INTO kek_rotations (kek_key_id, to_version, from_version, product, started_by, "
                    "started_at, rewrapped) VALUES (?, ?, ?, ?, ?, ?, 0)",
                    [
                        rotation.kek_key_id,
                        rotation.to_version,
                        rotation.from_version,
                        rotation.product,
                        rotation.started_by,
                        timestamp_text(rotation.started_at),
                    ],
                )
            except AlreadyExists:
                raise FailedPrecondition("a rotation to this KEK version was recorded already") from None

    def record_batch(self, rotation: KekRotation, rewraps: Sequence[Rewrap]) -> int:
        with self._db.transaction() as session:
            changed = devices.rewrap_rows(session, rotation.kek_key_id, rewraps)
            if changed:
                session.execute(
                    "UPDATE kek_rotations SET rewrapped = rewrapped + ? "
                    "WHERE kek_key_id = ? AND to_version = ?",
                    [changed, rotation.kek_key_id, rotation.to_version],
                )
        return changed

    def finish(self, rotation: KekRotation, at: datetime) -> KekRotation:
        with self._db.transaction() as session:
            session.execute(
                "UPDATE kek_rotations SET finished_at = COALESCE(finished_at, ?) "
                "WHERE kek_key_id = ? AND to_version = ?",
                [timestamp_text(at), rotation.kek_key_id, rotation.to_version],
            )
            stored = _get(session, rotation.kek_key_id, rotation.to_version)
        if stored is None:
            raise NotFound(f"no rotation of keys/{rotation.kek_key_id} to version {rotation.to_version}")
        return stored

    def latest(self, kek_key_id: str) -> KekRotation | None:
        with self._db.snapshot() as session:
            row = session.row(
                "SELECT * FROM kek_rotations WHERE kek_key_id = ? ORDER BY to_version DESC LIMIT 1",
                [kek_key_id],
            )
        return None if row is None else _from_row(row)

    def unfinished(self) -> list[KekRotation]:
        with self._db.snapshot() as session:
            rows = session.rows(
                "SELECT * FROM kek_rotations WHERE finished_at IS NULL ORDER BY started_at, kek_key_id"
            )
        return [_from_row(r) for r in rows]
