"""gRPC servicer of KEK rotation: ``KekRotationService`` (kmsapi/v1/kek.proto), for security officers.

``StartKekRotation`` rotates the product's KEK and records the job through ``KekRotationService.start``,
then wakes the background runner (``kms.server.kek_rotation_runner``) that rewraps; ``GetKekRotation``
reports the job's live counts. Errors become status codes in ``translate_errors``; only security officers
get here (``METHOD_ROLES`` in ``kms.server.auth``), and only for products in their scope (the use cases
check it). ``add_kek_rotation`` registers the servicer.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain.kek_rotation import KekRotation, KekRotationStatus
from kms.domain.keys import KeyName
from kms.server.audit_interceptor import note
from kms.server.auth import caller_of
from kms.server.errors import translate_errors
from kms.service.kek_rotation import KekRotationService
from kmsapi.v1 import kek_pb2, kek_pb2_grpc


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def rotation_pb(rotation: KekRotation, remaining: int) -> kek_pb2.KekRotation:
    message = kek_pb2.KekRotation(
        product=rotation.product,
        kek=str(KeyName(rotation.kek_key_id)),
        from_version=str(KeyName(rotation.kek_key_id, rotation.from_version)),
        to_version=str(KeyName(rotation.kek_key_id, rotation.to_version)),
        started_by=rotation.started_by,
        start_time=_timestamp(rotation.started_at),
        finished=rotation.finished,
        rewrapped=rotation.rewrapped,
        remaining=remaining,
        total=rotation.rewrapped + remaining,
    )
    if rotation.finished_at is not None:
        message.finish_time.CopyFrom(_timestamp(rotation.finished_at))
    return message


def status_pb(status: KekRotationStatus) -> kek_pb2.KekRotation:
    return rotation_pb(status.rotation, status.remaining)


class KekRotationServicer(kek_pb2_grpc.KekRotationServiceServicer):
    def __init__(self, service: KekRotationService, started: Callable[[], None]) -> None:
        self._service = service
        self._started = started

    @translate_errors
    def StartKekRotation(  # noqa: N802 - gRPC method name
        self, request: kek_pb2.StartKekRotationRequest, context: grpc.ServicerContext
    ) -> kek_pb2.KekRotation:
        note(product=request.product)
        caller = caller_of(context)
        rotation = self._service.start(caller, request.product)
        note(key_version=str(KeyName(rotation.kek_key_id, rotation.to_version)))
        self._started()
        return status_pb(self._service.status_for(caller, request.product))

    @translate_errors
    def GetKekRotation(  # noqa: N802 - gRPC method name
        self, request: kek_pb2.GetKekRotationRequest, context: grpc.ServicerContext
    ) -> kek_pb2.KekRotation:
        note(product=request.product)
        return status_pb(self._service.status_for(caller_of(context), request.product))


def add_kek_rotation(server: grpc.Server, service: KekRotationService, started: Callable[[], None]) -> None:
    """Serve ``KekRotationService`` on ``server``; ``started()`` is called after each new job (pass
    ``KekRotationRunner.wake``)."""
    kek_pb2_grpc.add_KekRotationServiceServicer_to_server(KekRotationServicer(service, started), server)
