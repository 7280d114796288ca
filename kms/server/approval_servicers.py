"""gRPC servicer of dual control: ``ApprovalService`` (kmsapi/v1/approvals.proto).

Each method parses the request, calls ``DualControl`` (``kms.service.approvals``) with the authenticated
caller, notes the request id and target for the audit record, and builds the response. Executing a key
version destruction calls ``KeyLifecycle.schedule_destroy`` with the delay recorded in the request and the
executing officer as the actor. ``add_approvals`` registers the servicer on a server.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain.approvals import Action, ApprovalRequest, ApprovalState, Vote
from kms.domain.errors import InvalidArgument, NotFound
from kms.domain.keys import KeyName
from kms.domain.lifecycle import ManagedKey
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


class ApprovalServicer(approvals_pb2_grpc.ApprovalServiceServicer):
    def __init__(self, dual_control: DualControl, lifecycle: KeyLifecycle) -> None:
        self._dual = dual_control
        self._lifecycle = lifecycle

    @translate_errors
    def RequestKeyVersionDestruction(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.RequestKeyVersionDestructionRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        caller = caller_of(context)
        name = KeyName.parse(request.name)
        if name.version is None:
            raise InvalidArgument(f"{request.name!r} names a key; a version is needed: 'keys/K/versions/N'")
        note(key_version=str(name))
        self._lifecycle.get(name.key_id).version(name.version)  # NotFound for an unknown version
        parameters: dict[str, str] = {}
        if request.HasField("delay_seconds"):
            if request.delay_seconds > _MAX_SECONDS:
                raise InvalidArgument(f"delay_seconds of {request.delay_seconds} seconds is out of range")
            parameters[DELAY_PARAMETER] = str(request.delay_seconds)
        if request.new_primary_version:
            wanted = KeyName.parse(request.new_primary_version)
            if wanted.version is None or wanted.key_id != name.key_id:
                raise InvalidArgument(
                    f"new_primary_version {request.new_primary_version!r} must name a version of the same "
                    f"key as {request.name!r}: 'keys/KEY_ID/versions/N'"
                )
            parameters[NEW_PRIMARY_PARAMETER] = str(wanted)
        created = self._dual.request(caller, Action.DESTROY_KEY_VERSION, str(name), parameters)
        note(resource=f"approvals/{created.id}")
        return request_pb(created, self._dual.now())

    @translate_errors
    def ListApprovalRequests(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.ListApprovalRequestsRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ListApprovalRequestsResponse:
        state = None
        if request.state != approvals_pb2.APPROVAL_STATE_UNSPECIFIED:
            state = _STATES_OF_PB.get(request.state)
            if state is None:
                raise InvalidArgument(f"unknown state {request.state}")
        now = self._dual.now()
        return approvals_pb2.ListApprovalRequestsResponse(
            requests=[request_pb(r, now) for r in self._dual.list(state)]
        )

    @translate_errors
    def ApproveRequest(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.ApproveRequestRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        approved = self._dual.approve(caller_of(context), _noted(request.id))
        return request_pb(approved, self._dual.now())

    @translate_errors
    def RejectRequest(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.RejectRequestRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ApprovalRequest:
        rejected = self._dual.reject(caller_of(context), _noted(request.id), request.reason)
        return request_pb(rejected, self._dual.now())

    @translate_errors
    def ExecuteRequest(  # noqa: N802 - gRPC method name
        self, request: approvals_pb2.ExecuteRequestRequest, context: grpc.ServicerContext
    ) -> approvals_pb2.ExecuteRequestResponse:
        caller = caller_of(context)
        request_id = _noted(request.id)
        note(key_version=self._dual.get(request_id).target)

        def act(approved: ApprovalRequest) -> ManagedKey:
            if approved.action is not Action.DESTROY_KEY_VERSION:
                raise NotFound(f"the act {approved.action.value} is not available on this server")
            delay = approved.parameters.get(DELAY_PARAMETER)
            new_primary = approved.parameters.get(NEW_PRIMARY_PARAMETER)
            return self._lifecycle.schedule_destroy(
                caller,
                approved.target,
                delay=None if delay is None else _delay(int(delay)),
                new_primary=None if new_primary is None else KeyName.parse(new_primary).version,
            )

        executed, managed = self._dual.execute(caller, request_id, act)
        return approvals_pb2.ExecuteRequestResponse(
            request=request_pb(executed, self._dual.now()), key=managed_key_pb(managed)
        )


def _delay(seconds: int) -> timedelta:
    return timedelta(seconds=seconds)


def add_approvals(server: grpc.Server, dual_control: DualControl, lifecycle: KeyLifecycle) -> None:
    """Serve ``ApprovalService`` on ``server``: requests and votes through ``dual_control``, the gated acts
    through ``lifecycle`` (the same ``KeyLifecycle`` as ``KeyAdminService``'s)."""
    approvals_pb2_grpc.add_ApprovalServiceServicer_to_server(
        ApprovalServicer(dual_control, lifecycle), server
    )
