"""gRPC side of anti-rollback floors: ``RollbackFloorService`` (kmsapi/v1/rollback.proto) and ``LowerFloor``,
the act of ``ApprovalService.RequestFloorLowering``.

``LowerFloor.prepare`` checks the request now (the product has a floor, the new one is below it) and records
in the request's parameters the new floor (``secure_version``) and the floor it saw (``current_floor``);
``execute`` lowers the floor only if it is still ``current_floor`` (``kms.domain.releases``), so officers who
approved "5 -> 2" never execute "7 -> 2".
"""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain.approvals import PRODUCT_PARAMETER, ApprovalRequest
from kms.domain.errors import FailedPrecondition
from kms.domain.identity import Caller
from kms.domain.releases import RollbackFloor
from kms.server.audit_interceptor import note
from kms.server.auth import caller_of
from kms.server.errors import translate_errors
from kms.service.rollback import RollbackFloors
from kmsapi.v1 import approvals_pb2, rollback_pb2, rollback_pb2_grpc

SECURE_VERSION_PARAMETER = "secure_version"
CURRENT_FLOOR_PARAMETER = "current_floor"
_TARGET_PREFIX, _TARGET_SUFFIX = "products/", "/rollback-floor"


def floor_target(product: str) -> str:
    """The target of a lowering request: ``products/P/rollback-floor``."""
    return f"{_TARGET_PREFIX}{product}{_TARGET_SUFFIX}"


def _product_of(request: ApprovalRequest) -> str:
    target = request.target
    if not (target.startswith(_TARGET_PREFIX) and target.endswith(_TARGET_SUFFIX)):
        raise FailedPrecondition(f"approval request {request.id} does not name a rollback floor: {target!r}")
    return target[len(_TARGET_PREFIX) : -len(_TARGET_SUFFIX)]


def _number(request: ApprovalRequest, name: str) -> int:
    value = request.parameters.get(name, "")
    if not value.isdigit():
        raise FailedPrecondition(f"approval request {request.id} lacks a valid {name} parameter")
    return int(value)


def floor_pb(floor: RollbackFloor) -> rollback_pb2.RollbackFloor:
    message = rollback_pb2.RollbackFloor(
        product=floor.product,
        updated_by=floor.lowered_by or "",
        update_request=f"approvals/{floor.lowering_request}" if floor.lowering_request else "",
    )
    if floor.secure_version is not None:
        message.secure_version = floor.secure_version
    if floor.lowered_at is not None:
        stamp = Timestamp()
        stamp.FromDatetime(floor.lowered_at)
        message.update_time.CopyFrom(stamp)
    return message


class RollbackFloorServicer(rollback_pb2_grpc.RollbackFloorServiceServicer):
    def __init__(self, floors: RollbackFloors) -> None:
        self._floors = floors

    @translate_errors
    def GetRollbackFloor(  # noqa: N802 - gRPC method name
        self, request: rollback_pb2.GetRollbackFloorRequest, context: grpc.ServicerContext
    ) -> rollback_pb2.RollbackFloor:
        note(product=request.product, resource=floor_target(request.product))
        return floor_pb(self._floors.get(caller_of(context), request.product))


class LowerFloor:
    """The act of lowering a product's anti-rollback floor (a ``GatedAct``, see approval_servicers)."""

    def __init__(self, floors: RollbackFloors) -> None:
        self._floors = floors

    def prepare(
        self, caller: Caller, message: approvals_pb2.RequestFloorLoweringRequest
    ) -> tuple[str, dict[str, str]]:
        note(product=message.product)
        current = self._floors.check_lowering(caller, message.product, message.secure_version)
        return floor_target(message.product), {
            PRODUCT_PARAMETER: message.product,
            SECURE_VERSION_PARAMETER: str(message.secure_version),
            CURRENT_FLOOR_PARAMETER: str(current),
        }

    def execute(self, caller: Caller, request: ApprovalRequest) -> approvals_pb2.ExecuteRequestResponse:
        product = _product_of(request)
        note(product=product)
        floor = self._floors.lower(
            caller,
            product,
            expected=_number(request, CURRENT_FLOOR_PARAMETER),
            secure_version=_number(request, SECURE_VERSION_PARAMETER),
            request_id=request.id,
        )
        return approvals_pb2.ExecuteRequestResponse(floor=floor_pb(floor))


def add_rollback_floor(server: grpc.Server, floors: RollbackFloors) -> None:
    """Serve ``RollbackFloorService`` on ``server``."""
    rollback_pb2_grpc.add_RollbackFloorServiceServicer_to_server(RollbackFloorServicer(floors), server)
