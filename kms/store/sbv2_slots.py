"""``SqliteSlotRevocationRepository``: revoked Secure Boot V2 slots (migration 7, ``sbv2_slot_revocations``).

Table::

    sbv2_slot_revocations  (product, slot) PK, slot 0-2, key_id REFERENCES keys (the key in the slot when it
                           was revoked), revoked_at, revoked_by (the executing officer), approval_id

Rows are only ever inserted: a revocation is permanent (``kms.domain.sbv2_slots``). ``revoke`` reads the
product's revocations, applies the domain rule and inserts in ONE ``BEGIN IMMEDIATE`` transaction, so two
officers executing revocations of two slots of the same product at once are serialized and the second sees
the first (and is refused if it would revoke the last active slot). The primary key refuses a second row
for the same slot as a last guard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kms.domain.sbv2_slots import SlotRevocation
from kms.store.database import Database, Row, Session, timestamp_text

_LIST = "SELECT * FROM sbv2_slot_revocations WHERE product = ? ORDER BY slot"
_INSERT = """
INSERT INTO sbv2_slot_revocations (product, slot, key_id, revoked_at, revoked_by, approval_id)
VALUES (?, ?, ?, ?, ?, ?)
"""


def _revocation(row: Row) -> SlotRevocation:
    return SlotRevocation(
        product=row.text("product"),
        slot=row.integer("slot"),
        key_id=row.text("key_id"),
        revoked_at=row.timestamp("revoked_at"),
        revoked_by=row.text("revoked_by"),
        approval_id=row.text("approval_id"),
    )


def _list(session: Session, product: str) -> list[SlotRevocation]:
    return [_revocation(row) for row in session.rows(_LIST, [product])]


class SqliteSlotRevocationRepository:
    """``kms.domain.sbv2_slots.SlotRevocationRepository`` on a ``Database``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def revoked_slots(self, product: str) -> frozenset[int]:
        with self._db.snapshot() as session:
            rows = session.rows("SELECT slot FROM sbv2_slot_revocations WHERE product = ?", [product])
        return frozenset(row.integer("slot") for row in rows)

    def list(self, product: str) -> list[SlotRevocation]:
        with self._db.snapshot() as session:
            return _list(session, product)

    def revoke(
        self, product: str, decide: Callable[[Sequence[SlotRevocation]], SlotRevocation]
    ) -> SlotRevocation:
        with self._db.transaction() as session:
            revocation = decide(_list(session, product))
            if revocation.product != product:
                raise ValueError(f"a revocation of product {product!r} names {revocation.product!r}")
            session.execute(
                _INSERT,
                [
                    revocation.product,
                    revocation.slot,
                    revocation.key_id,
                    timestamp_text(revocation.revoked_at),
                    revocation.revoked_by,
                    revocation.approval_id,
                ],
            )
        return revocation
