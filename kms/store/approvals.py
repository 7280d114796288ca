"""``SqliteApprovalRepository``: dual-control requests and votes (tables ``approval_requests`` and
``approval_votes``, see ``kms.store.database``).

``change`` reads a request, applies a pure rule of ``kms.domain.approvals`` and writes what changed (new
votes, the execution mark) in ONE ``BEGIN IMMEDIATE`` transaction, so two officers voting, or a rejection
racing an execution, are serialized: the second sees the first's result. The execution mark is written with
``executed_at IS NULL`` in its ``WHERE`` clause as a second guard, so a request is marked executed once only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from types import MappingProxyType

from kms.domain.approvals import Action, ApprovalRequest, Vote, check_no_open_duplicate
from kms.domain.errors import DataLoss, FailedPrecondition, NotFound
from kms.store.database import Database, Row, Session, timestamp_text


def _parameters(text: str) -> MappingProxyType[str, str]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise DataLoss("stored data is unreadable: approval parameters") from e
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise DataLoss("stored data is unreadable: approval parameters")
    return MappingProxyType(value)


def _load(session: Session, row: Row) -> ApprovalRequest:
    request_id = row.text("id")
    votes = session.rows(
        "SELECT officer, approve, reason, at FROM approval_votes WHERE request_id = ? ORDER BY at, officer",
        [request_id],
    )
    executed = row.optional_text("executed_at")
    return ApprovalRequest(
        id=request_id,
        action=row.enum("action", Action),
        target=row.text("target"),
        parameters=_parameters(row.text("parameters")),
        requester=row.text("requester"),
        required=row.integer("required"),
        created_at=row.timestamp("created_at"),
        expires_at=row.timestamp("expires_at"),
        approvals=tuple(
            Vote(v.text("officer"), v.timestamp("at")) for v in votes if v.integer("approve") == 1
        ),
        rejections=tuple(
            Vote(v.text("officer"), v.timestamp("at"), v.text("reason"))
            for v in votes
            if v.integer("approve") == 0
        ),
        executed_at=None if executed is None else row.timestamp("executed_at"),
        executed_by=row.optional_text("executed_by"),
    )


def _get(session: Session, request_id: str) -> ApprovalRequest:
    row = session.row("SELECT * FROM approval_requests WHERE id = ?", [request_id])
    if row is None:
        raise NotFound(f"no approval request {request_id!r}")
    return _load(session, row)


class SqliteApprovalRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, request: ApprovalRequest) -> None:
        with self._db.transaction() as session:
            rows = session.rows(
                "SELECT * FROM approval_requests WHERE action = ? AND target = ? AND executed_at IS NULL",
                [request.action.value, request.target],
            )
            check_no_open_duplicate(request, [_load(session, row) for row in rows])
            session.execute(
                "INSERT INTO approval_requests (id, action, target, parameters, requester, required, "
                "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    request.id,
                    request.action.value,
                    request.target,
                    json.dumps(dict(request.parameters), sort_keys=True, separators=(",", ":")),
                    request.requester,
                    request.required,
                    timestamp_text(request.created_at),
                    timestamp_text(request.expires_at),
                ],
            )
            _write_votes(session, request)

    def get(self, request_id: str) -> ApprovalRequest:
        with self._db.snapshot() as session:
            return _get(session, request_id)

    def list(self) -> list[ApprovalRequest]:
        with self._db.snapshot() as session:
            rows = session.rows("SELECT * FROM approval_requests ORDER BY created_at, id")
            return [_load(session, row) for row in rows]

    def change(self, request_id: str, apply: Callable[[ApprovalRequest], ApprovalRequest]) -> ApprovalRequest:
        with self._db.transaction() as session:
            before = _get(session, request_id)
            after = apply(before)
            _write_votes(session, after)
            if after.executed_at is not None and before.executed_at is None:
                marked = session.execute(
                    "UPDATE approval_requests SET executed_at = ?, executed_by = ? "
                    "WHERE id = ? AND executed_at IS NULL",
                    [timestamp_text(after.executed_at), after.executed_by, request_id],
                )
                if marked != 1:
                    raise FailedPrecondition(f"approval request {request_id} was executed already")
        return after

    def withdraw_execution(self, request_id: str, executed_at: datetime) -> None:
        with self._db.transaction() as session:
            session.execute(
                "UPDATE approval_requests SET executed_at = NULL, executed_by = NULL "
                "WHERE id = ? AND executed_at = ?",
                [request_id, timestamp_text(executed_at)],
            )


def _write_votes(session: Session, request: ApprovalRequest) -> None:
    """Insert the votes of ``request`` not yet stored (votes are only ever appended)."""
    votes = [(v, 1) for v in request.approvals] + [(v, 0) for v in request.rejections]
    stored = {
        r.text("officer")
        for r in session.rows("SELECT officer FROM approval_votes WHERE request_id = ?", [request.id])
    }
    for vote, approve in votes:
        if vote.officer in stored:
            continue
        session.execute(
            "INSERT INTO approval_votes (request_id, officer, approve, reason, at) VALUES (?, ?, ?, ?, ?)",
            [request.id, vote.officer, approve, vote.reason, timestamp_text(vote.at)],
        )
