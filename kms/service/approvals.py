"""``DualControl``: the use cases of dual control (rules in ``kms.domain.approvals``).

An officer requests an act, M other officers approve it, then an officer executes it: ``execute`` runs the
act, a callable given by the caller (for key version destruction, ``KeyLifecycle.schedule_destroy``).

Who may execute
---------------
Any security officer, the requester included, once the request is APPROVED and not expired. The control lies
in the M approvals of *others*; execution is the mechanical last step, and letting the requester do it keeps
them in charge of timing without giving them any power the approvers did not grant.

At most once, even across a crash
---------------------------------
``execute`` first marks the request EXECUTED in one transaction (a compare-and-set on ``executed_at IS NULL``
after checking the rules), and only then runs the act. Two concurrent executions: one wins the mark, the
other gets FAILED_PRECONDITION. If the act raises (the HSM is unavailable, the lifecycle rules refuse), the
mark is withdrawn, again by compare-and-set, so the request may be executed again while it lives. If the
process dies between the mark and the act, the request stays EXECUTED without effect: the act happened at
most once, and an officer sees that the key version was not scheduled and makes a new request. We choose
that over "act, then mark", under which a crash could let the act run twice.

Every call is also recorded by the audit interceptor (the servicer notes the request id and target).

Product scope
-------------
A request belongs to the product its parameters name (``ApprovalRequest.product``, see
``kms.domain.approvals``). Requesting, voting and executing call ``require_product`` with it, before
anything is written (a vote and an execution check it inside the same transaction as the rules);
``list_for`` shows an officer only the requests of products in its scope, and ``get_for`` refuses the
others. ``list`` and ``get`` are the unscoped reads for the server's own use.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TypeVar

from kms.domain import approvals
from kms.domain.approvals import (
    Action,
    ApprovalRepository,
    ApprovalRequest,
    ApprovalState,
    DualControlPolicy,
)
from kms.domain.errors import PermissionDenied
from kms.domain.identity import Caller, Role
from kms.domain.policy import in_scope, require_product

T = TypeVar("T")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _officer(caller: Caller) -> str:
    if caller.role is not Role.SECURITY_OFFICER:
        raise PermissionDenied("only security officers take part in dual control")
    return caller.identity


def _scoped(caller: Caller, request: ApprovalRequest) -> ApprovalRequest:
    """``request``, if its product is in ``caller``'s scope (``PermissionDenied`` otherwise)."""
    require_product(caller, request.product)
    return request


class DualControl:
    def __init__(
        self,
        store: ApprovalRepository,
        clock: Callable[[], datetime] = _utc_now,
        policy: DualControlPolicy | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self.policy = policy or DualControlPolicy()

    def now(self) -> datetime:
        return self._clock()

    def request(
        self, caller: Caller, action: Action, target: str, parameters: Mapping[str, str]
    ) -> ApprovalRequest:
        """Record a new PENDING request of ``caller`` for ``action`` on ``target``, of the product its
        ``parameters`` name (``PRODUCT_PARAMETER``), which must be in the caller's scope."""
        request = approvals.new_request(
            secrets.token_hex(8), action, target, parameters, _officer(caller), self._clock(), self.policy
        )
        require_product(caller, request.product)
        self._store.add(request)
        return request

    def get(self, request_id: str) -> ApprovalRequest:
        """A request, whatever its product (the server's own reads; officers go through ``get_for``)."""
        return self._store.get(request_id)

    def get_for(self, caller: Caller, request_id: str) -> ApprovalRequest:
        """A request, if its product is in ``caller``'s scope."""
        _officer(caller)
        return _scoped(caller, self._store.get(request_id))

    def approve(self, caller: Caller, request_id: str) -> ApprovalRequest:
        officer, now = _officer(caller), self._clock()
        return self._store.change(request_id, lambda r: approvals.approve(_scoped(caller, r), officer, now))

    def reject(self, caller: Caller, request_id: str, reason: str) -> ApprovalRequest:
        officer, now = _officer(caller), self._clock()
        return self._store.change(
            request_id, lambda r: approvals.reject(_scoped(caller, r), officer, reason, now)
        )

    def list_for(self, caller: Caller, state: ApprovalState | None = None) -> list[ApprovalRequest]:
        """``list``, restricted to the requests of products in ``caller``'s scope."""
        _officer(caller)
        return [r for r in self.list(state) if in_scope(caller, r.product)]

    def list(self, state: ApprovalState | None = None) -> list[ApprovalRequest]:
        """Every request (oldest first), or those in ``state`` now, whatever their product."""
        now = self._clock()
        return [r for r in self._store.list() if state is None or r.state_at(now) is state]

    def execute(
        self, caller: Caller, request_id: str, act: Callable[[ApprovalRequest], T]
    ) -> tuple[ApprovalRequest, T]:
        """Mark the request executed, then run ``act`` on it (see the module docstring: at most once)."""
        officer, now = _officer(caller), self._clock()
        marked = self._store.change(
            request_id, lambda r: approvals.mark_executed(_scoped(caller, r), officer, now)
        )
        try:
            result = act(marked)
        except Exception:
            assert marked.executed_at is not None
            self._store.withdraw_execution(request_id, marked.executed_at)
            raise
        return marked, result
