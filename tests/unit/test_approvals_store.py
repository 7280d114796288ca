"""Dual-control requests and votes in SQLite (``kms.store.approvals``), through ``DualControl``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kms.domain.approvals import Action, ApprovalState, DualControlPolicy
from kms.domain.errors import FailedPrecondition, NotFound, PermissionDenied
from kms.domain.identity import Caller, Role
from kms.service.approvals import DualControl
from kms.store.approvals import SqliteApprovalRepository
from kms.store.database import Database

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ALICE, BOB, CAROL = (
    Caller(f"spiffe://kms.dev/security-officer/{n}", Role.SECURITY_OFFICER) for n in ("alice", "bob", "carol")
)
TARGET = "keys/k/versions/1"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database.open(tmp_path / "kms.db") as database:
        yield database


def test_a_request_and_its_votes_round_trip(db: Database) -> None:
    clock = Clock()
    dual = DualControl(SqliteApprovalRepository(db), clock)
    made = dual.request(ALICE, Action.DESTROY_KEY_VERSION, TARGET, {"delay_seconds": "7200"})
    clock.now += timedelta(minutes=1)
    dual.approve(BOB, made.id)
    stored = SqliteApprovalRepository(db).get(made.id)
    assert stored.target == TARGET and dict(stored.parameters) == {"delay_seconds": "7200"}
    assert stored.requester == ALICE.identity and stored.required == 2
    assert (stored.created_at, stored.expires_at) == (T0, T0 + timedelta(hours=24))
    assert [(v.officer, v.at) for v in stored.approvals] == [(BOB.identity, T0 + timedelta(minutes=1))]
    assert stored.state_at(clock.now) is ApprovalState.PENDING


def test_votes_are_checked_against_the_stored_request(db: Database) -> None:
    dual = DualControl(SqliteApprovalRepository(db), Clock())
    made = dual.request(ALICE, Action.DESTROY_KEY_VERSION, TARGET, {})
    with pytest.raises(PermissionDenied):
        dual.approve(ALICE, made.id)
    dual.approve(BOB, made.id)
    with pytest.raises(FailedPrecondition, match="voted"):
        dual.approve(BOB, made.id)
    dual.reject(CAROL, made.id, "not this one")
    stored = dual.get(made.id)
    assert stored.state_at(T0) is ApprovalState.REJECTED
    assert [(v.officer, v.reason) for v in stored.rejections] == [(CAROL.identity, "not this one")]
    with pytest.raises(NotFound):
        dual.approve(BOB, "nope")


def test_execution_is_marked_once_even_when_racing(db: Database) -> None:
    dual = DualControl(SqliteApprovalRepository(db), Clock())
    made = dual.request(ALICE, Action.DESTROY_KEY_VERSION, TARGET, {})
    dual.approve(BOB, made.id)
    dual.approve(CAROL, made.id)
    runs: list[str] = []
    refused: list[Exception] = []
    lock = threading.Lock()

    def run(caller: Caller) -> None:
        try:
            dual.execute(caller, made.id, lambda r: runs.append(caller.identity))
        except FailedPrecondition as e:
            with lock:
                refused.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in (ALICE, BOB, CAROL) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1 and len(refused) == 8
    stored = dual.get(made.id)
    assert stored.state_at(T0) is ApprovalState.EXECUTED and stored.executed_by == runs[0]


def test_a_failed_act_leaves_the_request_executable(db: Database) -> None:
    dual = DualControl(SqliteApprovalRepository(db), Clock())
    made = dual.request(ALICE, Action.DESTROY_KEY_VERSION, TARGET, {})
    dual.approve(BOB, made.id)
    dual.approve(CAROL, made.id)

    def fails(_: object) -> None:
        raise FailedPrecondition("the lifecycle rules refuse")

    with pytest.raises(FailedPrecondition, match="lifecycle"):
        dual.execute(ALICE, made.id, fails)
    assert dual.get(made.id).state_at(T0) is ApprovalState.APPROVED
    executed, _ = dual.execute(BOB, made.id, lambda r: None)
    assert executed.executed_by == BOB.identity
    assert SqliteApprovalRepository(db).get(made.id).executed_by == BOB.identity


def test_list_by_state_follows_the_clock(db: Database) -> None:
    clock = Clock()
    dual = DualControl(
        SqliteApprovalRepository(db), clock, DualControlPolicy(required=1, ttl=timedelta(hours=1))
    )
    first = dual.request(ALICE, Action.DESTROY_KEY_VERSION, TARGET, {})
    clock.now += timedelta(minutes=30)
    second = dual.request(BOB, Action.DESTROY_KEY_VERSION, "keys/k/versions/2", {})
    dual.approve(ALICE, second.id)
    assert [r.id for r in dual.list()] == [first.id, second.id]
    assert [r.id for r in dual.list(ApprovalState.PENDING)] == [first.id]
    assert [r.id for r in dual.list(ApprovalState.APPROVED)] == [second.id]
    clock.now += timedelta(minutes=30)
    assert [r.id for r in dual.list(ApprovalState.EXPIRED)] == [first.id]
    with pytest.raises(FailedPrecondition, match="expired"):
        dual.execute(BOB, first.id, lambda r: None)


def test_one_open_request_per_act_and_target_even_when_racing(db: Database) -> None:
    """Eight officers request the same act on the same target at once on their own connections: the check
    and the insert share one write transaction, so exactly one request is stored."""
    import threading

    clock = Clock()
    officers = [Caller(f"spiffe://kms.dev/security-officer/o{i}", Role.SECURITY_OFFICER) for i in range(8)]
    barrier = threading.Barrier(len(officers))
    made: list[str] = []
    refused: list[str] = []

    def ask(officer: Caller) -> None:
        with Database.open(db.path) as own:
            dual = DualControl(SqliteApprovalRepository(own), clock)
            barrier.wait()
            try:
                made.append(dual.request(officer, Action.DESTROY_KEY_VERSION, TARGET, {}).id)
            except FailedPrecondition as refusal:
                refused.append(str(refusal))

    threads = [threading.Thread(target=ask, args=(o,)) for o in officers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(refused) == 7
    assert all(f"approval request {made[0]} " in r and "pending already" in r for r in refused)
    dual = DualControl(SqliteApprovalRepository(db), clock)
    dual.reject(
        officers[0] if dual.get(made[0]).requester != officers[0].identity else officers[1], made[0], "no"
    )
    again = dual.request(ALICE, Action.DESTROY_KEY_VERSION, TARGET, {})  # the first one is closed now
    assert again.id != made[0]
    assert dual.request(ALICE, Action.DESTROY_KEY_VERSION, "keys/k/versions/2", {}).id  # another target


def test_the_requester_withdraws_their_request(db: Database) -> None:
    dual = DualControl(SqliteApprovalRepository(db), Clock())
    made = dual.request(ALICE, Action.DESTROY_KEY_VERSION, TARGET, {})
    dual.reject(ALICE, made.id, "withdrawn: wrong version")
    assert dual.get(made.id).state_at(T0) is ApprovalState.REJECTED
    with pytest.raises(FailedPrecondition, match="rejected"):
        dual.approve(BOB, made.id)
