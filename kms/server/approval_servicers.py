"""gRPC servicer of dual control: ``ApprovalService`` (kmsapi/v1/approvals.proto).

Each method parses the request, calls ``DualControl`` (``kms.service.approvals``) with the authenticated
caller, notes the request id and target for the audit record, and builds the response.

The acts themselves are ``GatedAct`` objects, one per ``Action``, given to ``add_approvals``: ``prepare``
checks a Request* message and turns it into the request's target and parameters (strings, no secret),
among them the product the request belongs to (``PRODUCT_PARAMETER``); ``execute`` performs the approved act
as the executing officer and fills the act's part of the response. ``DualControl`` scopes every request,
vote, listing and execution by that product (``kms.service.approvals``).
An action with no act on this server is refused with FAILED_PRECONDITION. ``DestroyKeyVersion`` (below)
is the act of key version destruction: ``KeyLifecycle.schedule_destroy`` with the recorded delay.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain.approvals import PRODUCT_PARAMETER, Action, ApprovalRequest, ApprovalState, Vote
from kms.domain.errors import FailedPrecondition, InvalidArgument
from kms.domain.identity import Caller
from kms.domain.keys import KeyName
from kms.domain.lifecycle import ManagedKey
from kms.domain.policy import require_product
from kms.server.admin_servicers import managed_key_pb
from kms.server.audit_interceptor import note
from kms.server.auth import caller_of
from kms.server.errors import translate_errors
from kms.service.approvals import DualControl
from kms.service.lifecycle import KeyLifecycle
from kmsapi.v1 import approvals_pb2, approvals_pb2_grpc

ACTIONS = {
    Action.DESTROY_KEY_VERSION: approvals_pb2.APPROVAL_ACTION_DESTROY_KEY_VERSION,
    Action.REVOKE_SBV2_SLOT: approvals_pb2.APPROVAL_ACTION_REVOKE_SBV2_SLOT,
    Action.LOWER_ROLLBACK_FLOOR: approvals_pb2.APPROVAL_ACTION_LOWER_ROLLBACK_FLOOR,
    Action.REPROVISION_DEVICE_SECRET: approvals_pb2.APPROVAL_ACTION_REPROVISION_DEVICE_SECRET,
    Action.CHANGE_AUTHORIZATION_POLICY: approvals_pb2.APPROVAL_ACTION_CHANGE_AUTHORIZATION_POLICY,
}
STATES = {
    ApprovalState.PENDING: approvals_pb2.APPROVAL_STATE_PENDING,
    ApprovalState.APPROVED: approvals_pb2.APPROVAL_STATE_APPROVED,
    ApprovalState.REJECTED: approvals_pb2.APPROVAL_STATE_REJECTED,
    ApprovalState.EXPIRED: approvals_pb2.APPROVAL_STATE_EXPIRED,
    ApprovalState.EXECUTED: approvals_pb2.APPROVAL_STATE_EXECUTED,
}
_STATES_OF_PB = {number: state for state, number in STATES.items()}
_MAX_SECONDS = 10**10  # as in admin_servicers: a huge uint64 is INVALID_ARGUMENT, not an OverflowError
DELAY_PARAMETER = "delay_seconds"
NEW_PRIMARY_PARAMETER = "new_primary_version"


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _vote_pb(vote: Vote) -> approvals_pb2.ApprovalVote:
    return approvals_pb2.ApprovalVote(officer=vote.officer, time=_timestamp(vote.at), reason=vote.reason)


def request_pb(request: ApprovalRequest, now: datetime) -> approvals_pb2.ApprovalRequest:
    message = approvals_pb2.ApprovalRequest(
        id=request.id,
        action=ACTIONS[request.action],
        target=request.target,
        parameters=dict(request.parameters),
        requester=request.requester,
        create_time=_timestamp(request.created_at),
        expire_time=_timestamp(request.expires_at),
        required_approvals=request.required,
        approvals=[_vote_pb(v) for v in request.approvals],
        rejections=[_vote_pb(v) for v in request.rejections],
        state=STATES[request.state_at(now)],
        executed_by=request.executed_by or "",
    )
    if request.executed_at is not None:
        message.execute_time.CopyFrom(_timestamp(request.executed_at))
    return message


def _noted(request_id: str) -> str:
    note(resource=f"approvals/{request_id}")
    if not request_id:
        raise InvalidArgument("id is required")
    return request_id


class GatedAct(Protocol):
    """One act under dual control (see the module docstring)."""

    def prepare(self, caller: Caller, message: Any) -> tuple[str, dict[str, str]]:
        """Check a Request* message (NotFound, InvalidArgument, FailedPrecondition) and return the request's
        target (e.g. ``products/P/sbv2-slots/1``) and parameters. May call ``note`` for the audit record.

        The parameters MUST name the product the act touches under ``PRODUCT_PARAMETER`` (``"product"``),
        and ``prepare`` calls ``require_product(caller, product)`` once it knows it, before it writes
        anything: only officers of that product then see, approve and execute the request. Without it
        the request counts as one of ``SYSTEM_PRODUCT``, which only officers with every product touch."""
        ...

    def execute(self, caller: Caller, request: ApprovalRequest) -> approvals_pb2.ExecuteRequestResponse:
        """Perform the approved act as ``caller``; return a response with the act's field set (the servicer
        adds the request). Raising leaves the request APPROVED (``DualControl.execute``)."""
        ...


class DestroyKeyVersion:
    """The act of key version destruction: ``KeyLifecycle.schedule_destroy`` with the recorded delay."""

    def __init__(self, lifecycle: KeyLifecycle) -> None:
        self._lifecycle = lifecycle

    def prepare(
        self, caller: Caller, message: approvals_pb2.RequestKeyVersionDestructionRequest
    ) -> tuple[str, dict[str, str]]:
        name = KeyName.parse(message.name)
        if name.version is None:
            raise InvalidArgument(f"{message.name!r} names a key; a version is needed: 'keys/K/versions/N'")
        note(key_version=str(name))
        key = self._lifecycle.get(name.key_id)
        note(product=key.key.product)
        require_product(caller, key.key.product)
        key.version(name.version)  # NotFound for an unknown version
        parameters = {PRODUCT_PARAMETER: key.key.product}
        if message.HasField("delay_seconds"):
            if message.delay_seconds > _MAX_SECONDS:
                raise InvalidArgument(f"delay_seconds of {message.delay_seconds} seconds is out of range")
            parameters[DELAY_PARAMETER] = str(message.delay_seconds)
        if message.new_primary_version:
            wanted = KeyName.parse(message.new_primary_version)
            if wanted.version is None or wanted.key_id != name.key_id:
                raise InvalidArgument(
                    f"new_primary_version {message.new_primary_version!r} must name a version of the same "
                    f"key as {message.name!r}: 'keys/KEY_ID/versions/N'"
                )
            parameters[NEW_PRIMARY_PARAMETER] = str(wanted)
        return str(name), parameters

    def execute(self, caller: Caller, request: ApprovalRequest) -> approvals_pb2.ExecuteRequestResponse:
        note(key_version=request.target)
        delay = request.parameters.get(DELAY_PARAMETER)
        new_primary = request.parameters.get(NEW_PRIMARY_PARAMETER)
        managed: ManagedKey = self._lifecycle.schedule_destroy(
            caller,
            request.target,
            delay=None if delay is None else timedelta(seconds=int(delay)),
            new_primary=None if new_primary is None else KeyName.parse(new_primary).version,
        )
        return approvals_pb2.ExecuteRequestResponse(key=managed_key_pb(managed))


class ApprovalServicer(approvals_pb2_grpc.ApprovalServiceServicer):
    def __init__(self, dual_control: DualControl, acts: Mapping[Action, GatedAct]) -> None:
        self._dual = dual_control
        self._acts = dict(acts)

    def _act(self, action: Action) -> GatedAct:
        act = self._acts.get(action)
        if act is None:
            raise FailedPrecondition(f"the act {action.value} is not available on this server")
        return act

    def _request(
        self, action: Action, message: Any, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        caller = caller_of(context)
        target, parameters = self._act(action).prepare(caller, message)
        note(product=parameters.get(PRODUCT_PARAMETER))
        created = self._dual.request(caller, action, target, parameters)
        note(resource=f"approvals/{created.id}")
        return request_pb(created, self._dual.now())

    @translate_errors
    def RequestKeyVersionDestruction(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.RequestKeyVersionDestructionRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        return self._request(Action.DESTROY_KEY_VERSION, request, context)

    @translate_errors
    def RequestSlotRevocation(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.RequestSlotRevocationRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        return self._request(Action.REVOKE_SBV2_SLOT, request, context)

    @translate_errors
    def RequestFloorLowering(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.RequestFloorLoweringRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        return self._request(Action.LOWER_ROLLBACK_FLOOR, request, context)

    @translate_errors
    def RequestDeviceReprovisioning(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.RequestDeviceReprovisioningRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        return self._request(Action.REPROVISION_DEVICE_SECRET, request, context)

    @translate_errors
    def RequestPolicyChange(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.RequestPolicyChangeRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        return self._request(Action.CHANGE_AUTHORIZATION_POLICY, request, context)

    @translate_errors
    def ListApprovalRequests(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.ListApprovalRequestsRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ListApprovalRequestsResponse:
        state = None
        if request.state != approvals_pb2.APPROVAL_STATE_UNSPECIFIED:
            state = _STATES_OF_PB.get(request.state)
            if state is None:
                raise InvalidArgument(f"unknown state {request.state}")
        listed = self._dual.list_for(caller_of(context), state)
        now = self._dual.now()
        return approvals_pb2.ListApprovalRequestsResponse(requests=[request_pb(r, now) for r in listed])

    @translate_errors
    def ApproveRequest(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.ApproveRequestRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        approved = self._dual.approve(caller_of(context), _noted(request.id))
        note(product=approved.product)
        return request_pb(approved, self._dual.now())

    @translate_errors
    def RejectRequest(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.RejectRequestRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        rejected = self._dual.reject(caller_of(context), _noted(request.id), request.reason)
        note(product=rejected.product)
        return request_pb(rejected, self._dual.now())

    @translate_errors
    def ExecuteRequest(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.ExecuteRequestRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ExecuteRequestResponse:
        caller = caller_of(context)
        request_id = _noted(request.id)
        pending = self._dual.get_for(caller, request_id)
        note(product=pending.product)
        act = self._act(pending.action)
        executed, response = self._dual.execute(caller, request_id, lambda r: act.execute(caller, r))
        response.request.CopyFrom(request_pb(executed, self._dual.now()))
        return response


def add_approvals(server: grpc.Server, dual_control: DualControl, acts: Mapping[Action, GatedAct]) -> None:
    """Serve ``ApprovalService`` on ``server``: requests and votes through ``dual_control``, the acts through
    ``acts`` (``DestroyKeyVersion`` and the acts of the other services)."""
    approvals_pb2_grpc.add_ApprovalServiceServicer_to_server(ApprovalServicer(dual_control, acts), server)
