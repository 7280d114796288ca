"""Dual-control rules (kms.domain.approvals) and DualControl's execute-once, with an injected clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from kms.domain import approvals
from kms.domain.approvals import Action, ApprovalRequest, ApprovalState, DualControlPolicy, Vote
from kms.domain.errors import FailedPrecondition, HsmUnavailable, InvalidArgument, NotFound, PermissionDenied
from kms.domain.identity import Caller, Role
from kms.service.approvals import DualControl

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ALICE, BOB, CAROL, DAVE = (
    f"spiffe://kms.dev/security-officer/{n}" for n in ("alice", "bob", "carol", "dave")
)
TARGET = "keys/k/versions/1"


def _new(required: int = 2, ttl: timedelta = timedelta(hours=24)) -> ApprovalRequest:
    policy = DualControlPolicy(required=required, ttl=ttl)
    return approvals.new_request(
        "r1", Action.DESTROY_KEY_VERSION, TARGET, {"delay_seconds": "3600"}, ALICE, T0, policy
    )


def test_a_new_request_is_pending_until_its_ttl() -> None:
    request = _new()
    assert request.state_at(T0) is ApprovalState.PENDING
    assert request.expires_at == T0 + timedelta(hours=24)
    assert request.state_at(T0 + timedelta(hours=24)) is ApprovalState.EXPIRED
    assert dict(request.parameters) == {"delay_seconds": "3600"}


def test_the_requester_cannot_approve_but_may_withdraw() -> None:
    with pytest.raises(PermissionDenied, match="cannot vote"):
        approvals.approve(_new(), ALICE, T0)
    withdrawn = approvals.reject(_new(), ALICE, "withdrawn: wrong version", T0)
    assert withdrawn.state_at(T0) is ApprovalState.REJECTED
    assert withdrawn.rejections[0].officer == ALICE
    with pytest.raises(FailedPrecondition, match="rejected"):
        approvals.approve(withdrawn, BOB, T0)


def test_a_second_open_request_for_the_same_act_and_target_is_refused() -> None:
    first = _new()
    again = replace(first, id="r2", requester=BOB)
    with pytest.raises(FailedPrecondition, match=f"request {first.id} .* is pending already"):
        approvals.check_no_open_duplicate(again, [first])
    approved = replace(first, approvals=(Vote(BOB, T0), Vote(CAROL, T0)))
    with pytest.raises(FailedPrecondition, match="is approved already"):
        approvals.check_no_open_duplicate(again, [approved])
    # closed requests, other targets and other acts do not count
    rejected = approvals.reject(first, BOB, "no", T0)
    executed = replace(approved, executed_at=T0, executed_by=BOB)
    expired = replace(first, expires_at=T0)
    other_target = replace(first, target="keys/other/versions/1")
    other_act = replace(first, action=Action.REVOKE_SBV2_SLOT)
    approvals.check_no_open_duplicate(again, [rejected, executed, expired, other_target, other_act])


def test_one_approval_per_officer() -> None:
    once = approvals.approve(_new(required=3), BOB, T0)
    with pytest.raises(FailedPrecondition, match="voted"):
        approvals.approve(once, BOB, T0)
    with pytest.raises(FailedPrecondition, match="voted"):
        approvals.reject(once, BOB, "changed my mind", T0)
    assert len(once.approvals) == 1


@pytest.mark.parametrize("required", [1, 2, 3])
def test_m_distinct_approvals_make_it_approved(required: int) -> None:
    request = _new(required=required)
    for n, officer in enumerate((BOB, CAROL, DAVE)[:required], start=1):
        assert request.state_at(T0) is ApprovalState.PENDING
        with pytest.raises(FailedPrecondition, match=f"{required - n + 1} more approval"):
            approvals.mark_executed(request, officer, T0)
        request = approvals.approve(request, officer, T0)
    assert request.state_at(T0) is ApprovalState.APPROVED
    with pytest.raises(FailedPrecondition, match="approved already"):
        approvals.approve(request, "spiffe://kms.dev/security-officer/eve", T0)


def test_one_rejection_is_final() -> None:
    rejected = approvals.reject(approvals.approve(_new(), BOB, T0), CAROL, "wrong version", T0)
    assert rejected.state_at(T0) is ApprovalState.REJECTED
    assert rejected.rejections[0].reason == "wrong version"
    with pytest.raises(FailedPrecondition, match="rejected"):
        approvals.approve(rejected, DAVE, T0)
    with pytest.raises(FailedPrecondition, match="rejected"):
        approvals.mark_executed(rejected, BOB, T0)


def test_an_approved_request_may_still_be_rejected_before_execution() -> None:
    approved = approvals.approve(approvals.approve(_new(), BOB, T0), CAROL, T0)
    rejected = approvals.reject(approved, DAVE, "hold on", T0)
    assert rejected.state_at(T0) is ApprovalState.REJECTED


def test_a_rejection_needs_a_reason() -> None:
    with pytest.raises(InvalidArgument, match="reason"):
        approvals.reject(_new(), BOB, "  ", T0)


def test_an_expired_request_can_be_neither_approved_nor_executed() -> None:
    approved = approvals.approve(approvals.approve(_new(), BOB, T0), CAROL, T0)
    later = T0 + timedelta(hours=24)
    assert approved.state_at(later) is ApprovalState.EXPIRED
    with pytest.raises(FailedPrecondition, match="expired"):
        approvals.approve(_new(), BOB, later)
    with pytest.raises(FailedPrecondition, match="expired"):
        approvals.mark_executed(approved, BOB, later)


def test_executed_once_only() -> None:
    approved = approvals.approve(approvals.approve(_new(), BOB, T0), CAROL, T0)
    executed = approvals.mark_executed(approved, ALICE, T0)
    assert executed.state_at(T0) is ApprovalState.EXECUTED
    assert executed.state_at(T0 + timedelta(days=9)) is ApprovalState.EXECUTED, "execution outlives expiry"
    with pytest.raises(FailedPrecondition, match="executed"):
        approvals.mark_executed(executed, BOB, T0)
    with pytest.raises(FailedPrecondition, match="executed"):
        approvals.reject(executed, DAVE, "too late", T0)


@pytest.mark.parametrize(
    ("required", "ttl"), [(0, timedelta(hours=1)), (2, timedelta(0)), (2, timedelta(seconds=-1))]
)
def test_policy_is_validated(required: int, ttl: timedelta) -> None:
    with pytest.raises(InvalidArgument):
        DualControlPolicy(required=required, ttl=ttl)


def test_a_request_needs_a_target_and_small_parameters() -> None:
    policy = DualControlPolicy()
    with pytest.raises(InvalidArgument):
        approvals.new_request("r", Action.DESTROY_KEY_VERSION, "", {}, ALICE, T0, policy)
    with pytest.raises(InvalidArgument):
        approvals.new_request("r", Action.DESTROY_KEY_VERSION, TARGET, {"x": "y" * 300}, ALICE, T0, policy)


# --- DualControl over an in-memory repository -------------------------------------------------------------


class MemoryApprovals:
    def __init__(self) -> None:
        self.requests: dict[str, ApprovalRequest] = {}

    def add(self, request: ApprovalRequest) -> None:
        approvals.check_no_open_duplicate(request, self.requests.values())
        self.requests[request.id] = request

    def get(self, request_id: str) -> ApprovalRequest:
        if request_id not in self.requests:
            raise NotFound(request_id)
        return self.requests[request_id]

    def list(self) -> list[ApprovalRequest]:
        return list(self.requests.values())

    def change(self, request_id: str, apply: Callable[[ApprovalRequest], ApprovalRequest]) -> ApprovalRequest:
        self.requests[request_id] = apply(self.get(request_id))
        return self.requests[request_id]

    def withdraw_execution(self, request_id: str, executed_at: datetime) -> None:
        current = self.get(request_id)
        if current.executed_at == executed_at:
            self.requests[request_id] = replace(current, executed_at=None, executed_by=None)


def _officer(identity: str) -> Caller:
    return Caller(identity, Role.SECURITY_OFFICER)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_dual_control_flow_runs_the_act_once() -> None:
    clock = Clock()
    dual = DualControl(MemoryApprovals(), clock)
    request = dual.request(_officer(ALICE), Action.DESTROY_KEY_VERSION, TARGET, {})
    dual.approve(_officer(BOB), request.id)
    runs: list[str] = []
    with pytest.raises(FailedPrecondition, match="1 more approval"):
        dual.execute(_officer(BOB), request.id, lambda r: runs.append(r.target))
    dual.approve(_officer(CAROL), request.id)
    assert [r.id for r in dual.list(ApprovalState.APPROVED)] == [request.id]
    executed, _ = dual.execute(_officer(ALICE), request.id, lambda r: runs.append(r.target))
    assert executed.executed_by == ALICE and runs == [TARGET]
    with pytest.raises(FailedPrecondition, match="executed"):
        dual.execute(_officer(BOB), request.id, lambda r: runs.append(r.target))
    assert runs == [TARGET]


def test_a_failed_act_withdraws_the_mark_so_it_may_be_retried() -> None:
    dual = DualControl(MemoryApprovals(), Clock())
    request = dual.request(_officer(ALICE), Action.DESTROY_KEY_VERSION, TARGET, {})
    dual.approve(_officer(BOB), request.id)
    dual.approve(_officer(CAROL), request.id)

    def failing(_: ApprovalRequest) -> None:
        raise HsmUnavailable("down")

    with pytest.raises(HsmUnavailable):
        dual.execute(_officer(ALICE), request.id, failing)
    assert dual.get(request.id).state_at(T0) is ApprovalState.APPROVED
    executed, result = dual.execute(_officer(ALICE), request.id, lambda r: "done")
    assert result == "done" and executed.state_at(T0) is ApprovalState.EXECUTED


def test_only_officers_take_part() -> None:
    dual = DualControl(MemoryApprovals(), Clock())
    with pytest.raises(PermissionDenied):
        dual.request(
            Caller("spiffe://kms.dev/auditor/a", Role.AUDITOR), Action.DESTROY_KEY_VERSION, TARGET, {}
        )


def test_expiry_follows_the_clock() -> None:
    clock = Clock()
    dual = DualControl(MemoryApprovals(), clock, DualControlPolicy(required=1, ttl=timedelta(minutes=5)))
    request = dual.request(_officer(ALICE), Action.DESTROY_KEY_VERSION, TARGET, {})
    clock.now = T0 + timedelta(minutes=5)
    with pytest.raises(FailedPrecondition, match="expired"):
        dual.approve(_officer(BOB), request.id)
    assert [r.id for r in dual.list(ApprovalState.EXPIRED)] == [request.id]
