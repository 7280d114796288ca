"""Dual control: an act that destroys or weakens needs the approval of M officers other than its requester.

The model
---------
An officer *requests* an act (``ApprovalRequest``): which act (``Action``), on what (``target``, e.g.
``keys/K/versions/N``), with which small parameters (``parameters``, strings only), by whom and when, and
until when it may be approved or executed (``expires_at``, default 24 h after the request). Other officers
*approve* or *reject* it. The rules, all in the pure functions of this module:

- the requester cannot approve their own request: the second pair of eyes must be another's; they may
  withdraw it (a rejection by the requester);
- while a request for an act on a target is open (PENDING or APPROVED), a second one for the same act and
  target is refused (``check_no_open_duplicate``): votes are not split, and an act is not executed twice;
- an officer approves a request once; a second approval by the same identity is refused, not counted;
- ``required`` (M, default 2) approvals by distinct officers make the request APPROVED;
- one rejection makes it REJECTED, for good (a new request must be made);
- once ``expires_at`` has passed, a request that was not executed is EXPIRED: it can be neither approved nor
  executed (``state_at`` computes it from the clock, so no background job is needed);
- an APPROVED request is executed once: ``mark_executed`` moves it to EXECUTED, after which nothing changes.

States::

    PENDING ──(M distinct approvals)──► APPROVED ──(execute)──► EXECUTED
    PENDING, APPROVED ──(reject)──► REJECTED      (an APPROVED request may still be rejected before execution)
    PENDING, APPROVED ──(now ≥ expires_at)──► EXPIRED

Refusals are ``FailedPrecondition`` (the rules refuse it in this state) or ``PermissionDenied`` (this officer
may not vote on this request), with messages that say why.

Product scope
-------------
Every request belongs to one product, held in its parameters under ``PRODUCT_PARAMETER`` (``"product"``)
and filled by the act that prepared the request (the product of the key version to destroy, ...). Only
officers whose scope includes that product see the request, vote on it or execute it
(``kms.service.approvals``). A request without that parameter (one made before it existed, or by an act
that forgot it) counts as one of ``SYSTEM_PRODUCT``: only officers with every product may touch it, which
fails closed. Changing the authorization policy is an act on ``SYSTEM_PRODUCT`` itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Protocol

from kms.domain.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from kms.domain.keys import SYSTEM_PRODUCT, validate_product

PRODUCT_PARAMETER = "product"
"""The parameter that names the product a request belongs to (every act's ``prepare`` must set it)."""

DEFAULT_REQUIRED = 2
DEFAULT_TTL = timedelta(hours=24)
MAX_PARAMETERS = 16
MAX_PARAMETER_LENGTH = 256


class Action(enum.Enum):
    """The acts under dual control (their acts are given to ``kms.server.approval_servicers``)."""

    DESTROY_KEY_VERSION = "destroy-key-version"
    REVOKE_SBV2_SLOT = "revoke-sbv2-slot"
    LOWER_ROLLBACK_FLOOR = "lower-rollback-floor"
    REPROVISION_DEVICE_SECRET = "reprovision-device-secret"  # noqa: S105 - an act's name, no secret
    CHANGE_AUTHORIZATION_POLICY = "change-authorization-policy"


class ApprovalState(enum.Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    EXECUTED = "executed"


@dataclass(frozen=True)
class Vote:
    """One officer's approval or rejection (``reason`` is set for rejections only)."""

    officer: str
    at: datetime
    reason: str = ""


@dataclass(frozen=True)
class DualControlPolicy:
    """M (``required`` distinct approvals) and the lifetime of a request."""

    required: int = DEFAULT_REQUIRED
    ttl: timedelta = DEFAULT_TTL

    def __post_init__(self) -> None:
        if self.required < 1:
            raise InvalidArgument("dual control needs at least one approval")
        if self.ttl <= timedelta(0):
            raise InvalidArgument("the lifetime of an approval request must be positive")


@dataclass(frozen=True)
class ApprovalRequest:
    id: str
    action: Action
    target: str
    requester: str
    created_at: datetime
    expires_at: datetime
    required: int
    parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    approvals: tuple[Vote, ...] = ()
    rejections: tuple[Vote, ...] = ()
    executed_at: datetime | None = None
    executed_by: str | None = None

    @property
    def product(self) -> str:
        """The product the request belongs to (``PRODUCT_PARAMETER``; ``SYSTEM_PRODUCT`` without it)."""
        return product_of(self.parameters)

    def state_at(self, now: datetime) -> ApprovalState:
        """The state at ``now``: rejection and execution are final; otherwise expiry, then the vote count."""
        if self.executed_at is not None:
            return ApprovalState.EXECUTED
        if self.rejections:
            return ApprovalState.REJECTED
        if now >= self.expires_at:
            return ApprovalState.EXPIRED
        if len(self.approvals) >= self.required:
            return ApprovalState.APPROVED
        return ApprovalState.PENDING


def product_of(parameters: Mapping[str, str]) -> str:
    """The product named by a request's ``parameters``; ``SYSTEM_PRODUCT`` when none is (fail closed)."""
    return parameters.get(PRODUCT_PARAMETER, SYSTEM_PRODUCT)


def new_request(
    request_id: str,
    action: Action,
    target: str,
    parameters: Mapping[str, str],
    requester: str,
    now: datetime,
    policy: DualControlPolicy,
) -> ApprovalRequest:
    if not target:
        raise InvalidArgument("an approval request needs a target")
    if len(parameters) > MAX_PARAMETERS or any(
        len(k) > MAX_PARAMETER_LENGTH or len(v) > MAX_PARAMETER_LENGTH for k, v in parameters.items()
    ):
        raise InvalidArgument(
            f"at most {MAX_PARAMETERS} parameters of at most {MAX_PARAMETER_LENGTH} characters"
        )
    validate_product(product_of(parameters))
    return ApprovalRequest(
        id=request_id,
        action=action,
        target=target,
        requester=requester,
        created_at=now,
        expires_at=now + policy.ttl,
        required=policy.required,
        parameters=MappingProxyType(dict(parameters)),
    )


def check_no_open_duplicate(request: ApprovalRequest, others: Iterable[ApprovalRequest]) -> None:
    """Refuse a new request while another request for the same act on the same target is still open
    (PENDING or APPROVED at the new request's creation time): two live requests for one act would split the
    officers' votes and could both be executed. ``FailedPrecondition`` names the open one."""
    for other in others:
        if other.id == request.id or (other.action, other.target) != (request.action, request.target):
            continue
        state = other.state_at(request.created_at)
        if state in (ApprovalState.PENDING, ApprovalState.APPROVED):
            raise FailedPrecondition(
                f"approval request {other.id} for {request.action.value} on {request.target} is "
                f"{state.value} already (requested by {other.requester}): approve or execute it, or have it "
                "rejected or withdrawn, before requesting again"
            )


def _open_for_votes(
    request: ApprovalRequest, officer: str, now: datetime, *, withdrawal: bool = False
) -> None:
    state = request.state_at(now)
    if state not in (ApprovalState.PENDING, ApprovalState.APPROVED):
        raise FailedPrecondition(f"approval request {request.id} is {state.value}: it takes no more votes")
    if officer == request.requester and not withdrawal:
        raise PermissionDenied(
            f"{officer} requested {request.id} and cannot vote on it for approval: another officer must "
            f"approve (the requester may withdraw it: 'kmsctl approvals reject {request.id} --reason ...')"
        )
    if any(v.officer == officer for v in (*request.approvals, *request.rejections)):
        raise FailedPrecondition(f"{officer} has voted on approval request {request.id} already")


def approve(request: ApprovalRequest, officer: str, now: datetime) -> ApprovalRequest:
    """Add ``officer``'s approval. Refused for the requester, a second vote, or a closed request."""
    _open_for_votes(request, officer, now)
    if request.state_at(now) is ApprovalState.APPROVED:
        raise FailedPrecondition(f"approval request {request.id} is approved already; execute it")
    return replace(request, approvals=(*request.approvals, Vote(officer, now)))


def reject(request: ApprovalRequest, officer: str, reason: str, now: datetime) -> ApprovalRequest:
    """Reject the request for good (a reason is required, so the audit trail says why). The requester may
    reject their own request too: that is a withdrawal (it can only make the act less likely)."""
    if not reason.strip():
        raise InvalidArgument("a rejection needs a reason")
    if len(reason) > MAX_PARAMETER_LENGTH:
        raise InvalidArgument(f"a rejection reason has at most {MAX_PARAMETER_LENGTH} characters")
    _open_for_votes(request, officer, now, withdrawal=True)
    return replace(request, rejections=(*request.rejections, Vote(officer, now, reason)))


def mark_executed(request: ApprovalRequest, executor: str, now: datetime) -> ApprovalRequest:
    """The request, executed by ``executor`` at ``now``. Only an APPROVED, unexpired request may be."""
    state = request.state_at(now)
    if state is not ApprovalState.APPROVED:
        needed = request.required - len(request.approvals)
        detail = f" ({needed} more approval(s) needed)" if state is ApprovalState.PENDING else ""
        raise FailedPrecondition(f"approval request {request.id} is {state.value}{detail}: not executable")
    return replace(request, executed_at=now, executed_by=executor)


class ApprovalRepository(Protocol):
    """Where approval requests live (``kms.store.approvals``). Every change is read-check-write in one
    transaction: ``change`` applies a pure function of this module to the stored request and writes the
    result only if it is still the one read, so concurrent votes and executions cannot interleave."""

    def add(self, request: ApprovalRequest) -> None:
        """Store a new request; in the same transaction refuse it if ``check_no_open_duplicate`` does
        against the stored requests."""
        ...

    def get(self, request_id: str) -> ApprovalRequest: ...

    def list(self) -> list[ApprovalRequest]: ...

    def change(
        self, request_id: str, apply: Callable[[ApprovalRequest], ApprovalRequest]
    ) -> ApprovalRequest: ...

    def withdraw_execution(self, request_id: str, executed_at: datetime) -> None:
        """Undo ``mark_executed`` (only while ``executed_at`` is still the stored value)."""
        ...
