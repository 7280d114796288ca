"""``SqliteRolloverRepository``: OTA manifest key rollover statements (``kms.domain.rollover``).

Table (migration 8)::

    manifest_key_rollovers  (key_id, to_version) PK REFERENCES key_versions, from_version (< to_version),
                            statement BLOB (the FKRS v1 bytes, as devices read them), created_at

A statement is written by ``insert_rollover`` inside the transaction that adds the version it introduces
(``SqliteKeyRepository.apply_change``), so a version has its statement from the moment it exists, or never
(its predecessor was not enabled: a gap). Rows are never changed or deleted; a destroyed version keeps its
statement, which holds only public data and still links the chain for devices that trust older keys.
"""

from __future__ import annotations

from kms.domain.errors import AlreadyExists
from kms.domain.rollover import ManifestKeyRollover
from kms.store.database import Database, Row, Session, timestamp_text


def insert_rollover(session: Session, rollover: ManifestKeyRollover) -> None:
    """Store a statement inside the caller's transaction; ``AlreadyExists`` if its version has one."""
    if session.row(
        "SELECT 1 FROM manifest_key_rollovers WHERE key_id = ? AND to_version = ?",
        [rollover.key_id, rollover.to_version],
    ):
        raise AlreadyExists(f"{rollover.to_name} has a rollover statement already")
    session.execute(
        "INSERT INTO manifest_key_rollovers (key_id, from_version, to_version, statement, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [
            rollover.key_id,
            rollover.from_version,
            rollover.to_version,
            rollover.statement,
            timestamp_text(rollover.created_at),
        ],
    )


def _from_row(row: Row) -> ManifestKeyRollover:
    return ManifestKeyRollover(
        key_id=row.text("key_id"),
        from_version=row.integer("from_version"),
        to_version=row.integer("to_version"),
        statement=row.blob("statement"),
        created_at=row.timestamp("created_at"),
    )


class SqliteRolloverRepository:
    """``kms.domain.ports.RolloverRepository`` on a ``Database`` (reads; writes go with ``apply_change``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def list_rollovers(self, key_id: str) -> list[ManifestKeyRollover]:
        """Every statement of the key, by ``to_version``."""
        with self._db.snapshot() as session:
            rows = session.rows(
                "SELECT * FROM manifest_key_rollovers WHERE key_id = ? ORDER BY to_version", [key_id]
            )
        return [_from_row(row) for row in rows]
