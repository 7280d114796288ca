"""``SqlitePolicyRepository``: authorization policy versions and proposed texts (tables ``policy_versions``
and ``policy_drafts``, migration 10, see ``kms.store.database``).

A proposed text is kept as a draft under its SHA-256, because an approval request holds only short strings:
the request names the text by hash, and executing it installs exactly the text that was approved. A draft
is written when the text is proposed, before the approval request exists (the request may still be
refused), so drafts that no request needs pile up: ``add_draft`` deletes those older than the retention the
caller names (``kms.service.policy``: 30 days, or the approval TTL if longer), and proposing a text again
dates its draft anew.
``install`` writes version n+1 only if n is still the newest version inside its ``BEGIN IMMEDIATE``
transaction (and the primary key backs that up), so two approved changes racing each other cannot both
build on the same version. ``latest_version`` is one indexed ``max()``, cheap enough for every server
process to ask once a second (``kms.service.policy``).
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from kms.domain.errors import DataLoss, FailedPrecondition, NotFound
from kms.domain.policy import StoredPolicy
from kms.store.database import Database, Row, Session, timestamp_text


def _latest_version(session: Session) -> int:
    row = session.row("SELECT coalesce(max(version), 0) AS version FROM policy_versions")
    return 0 if row is None else row.integer("version")


def _from_row(row: Row) -> StoredPolicy:
    policy = StoredPolicy(
        version=row.integer("version"),
        text=row.text("text"),
        created_at=row.timestamp("created_at"),
        created_by=row.text("created_by"),
        approval_id=row.text("approval_id"),
    )
    if policy.sha256 != row.blob("sha256"):
        raise DataLoss(f"stored data is unreadable: policy version {policy.version} does not match its hash")
    return policy


class SqlitePolicyRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def latest_version(self) -> int:
        with self._db.snapshot() as session:
            return _latest_version(session)

    def latest(self) -> StoredPolicy | None:
        with self._db.snapshot() as session:
            row = session.row("SELECT * FROM policy_versions ORDER BY version DESC LIMIT 1")
            return None if row is None else _from_row(row)

    def version(self, number: int) -> StoredPolicy | None:
        with self._db.snapshot() as session:
            row = session.row("SELECT * FROM policy_versions WHERE version = ?", [number])
            return None if row is None else _from_row(row)

    def add_draft(self, text: str, now: datetime, prune_before: datetime | None = None) -> bytes:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        with self._db.transaction() as session:
            if prune_before is not None:
                session.execute(
                    "DELETE FROM policy_drafts WHERE created_at < ?", [timestamp_text(prune_before)]
                )
            session.execute(
                "INSERT INTO policy_drafts (sha256, text, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (sha256) DO UPDATE SET created_at = excluded.created_at",
                [digest, text, timestamp_text(now)],
            )
        return digest

    def draft(self, sha256: bytes) -> str:
        with self._db.snapshot() as session:
            row = session.row("SELECT text FROM policy_drafts WHERE sha256 = ?", [sha256])
        if row is None:
            raise NotFound(f"no proposed policy with SHA-256 {sha256.hex()}")
        text = row.text("text")
        if hashlib.sha256(text.encode("utf-8")).digest() != sha256:
            raise DataLoss(f"stored data is unreadable: the proposed policy {sha256.hex()} does not match")
        return text

    def install(self, policy: StoredPolicy) -> None:
        if policy.created_at is None:
            raise ValueError("an installed policy version needs its creation time")
        with self._db.transaction() as session:
            latest = _latest_version(session)
            if policy.version != latest + 1:
                raise FailedPrecondition(
                    f"policy version {latest} was installed meanwhile; "
                    f"version {policy.version} cannot follow it"
                )
            session.execute(
                "INSERT INTO policy_versions (version, text, sha256, created_at, created_by, approval_id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    policy.version,
                    policy.text,
                    policy.sha256,
                    timestamp_text(policy.created_at),
                    policy.created_by,
                    policy.approval_id,
                ],
            )
