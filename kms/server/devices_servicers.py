"""gRPC servicers of the factory (DeviceRegistryService) and distribution (DistributionService) paths, and
``ReprovisionDevice``, the act of ``ApprovalService.RequestDeviceReprovisioning`` (dual control).

``ReprovisionDevice.prepare`` checks the device now (registered, in the officer's product scope, not revoked)
and records the reason; ``execute`` opens the device for re-provisioning until the request's expiry. No
secret is in the request: the new one arrives later through ``RegisterDevices``, whose audit record then
names the re-provisioned device (``devices/ID``, or the first and a count if the stream replaced several
secrets), so the record of the secret's replacement is found by device like the other device calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain.approvals import MAX_PARAMETER_LENGTH, PRODUCT_PARAMETER, ApprovalRequest
from kms.domain.devices import Device, Registration
from kms.domain.errors import FailedPrecondition, InvalidArgument, KmsError
from kms.domain.identity import Caller
from kms.domain.ports import TransportBatch
from kms.server.audit_interceptor import note
from kms.server.auth import caller_of
from kms.server.errors import status_of, translate_errors
from kms.service.distribution import DEFAULT_SEGMENT_SIZE, Distribution, PayloadFormat
from kms.service.registry import DeviceRegistry, RegistrationRow
from kms.service.reprovisioning import DeviceReprovisioning
from kmsapi.v1 import approvals_pb2, devices_pb2, devices_pb2_grpc

PAYLOAD_CHUNK = 64 * 1024

FORMATS = {
    devices_pb2.PAYLOAD_FORMAT_UNSPECIFIED: PayloadFormat.FKSP_V1,
    devices_pb2.FKSP_V1: PayloadFormat.FKSP_V1,
    devices_pb2.ESP_ENCRYPTED_IMG_ECIES: PayloadFormat.ESP_ENCRYPTED_IMG,
}
FORMATS_PB = {
    PayloadFormat.FKSP_V1: devices_pb2.FKSP_V1,
    PayloadFormat.ESP_ENCRYPTED_IMG: devices_pb2.ESP_ENCRYPTED_IMG_ECIES,
}


REASON_PARAMETER = "reason"
_OUTCOMES = {
    Registration.CREATED: devices_pb2.RowOutcome.CREATED,
    Registration.UNCHANGED: devices_pb2.RowOutcome.UNCHANGED,
    Registration.REPROVISIONED: devices_pb2.RowOutcome.REPROVISIONED,
}


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def device_pb(device: Device, now: datetime) -> devices_pb2.DeviceInfo:
    """The device as ``DeviceInfo``; ``reprovision_until`` only while the window is open at ``now``."""
    message = devices_pb2.DeviceInfo(
        device_id=device.device_id,
        product=device.product,
        chip=device.chip,
        state=device.state.value,
        kek_version=f"keys/{device.secret.kek_key_id}/versions/{device.secret.kek_version}",
        has_ecies_public_key=device.ecies_public_key is not None,
        registered_by=device.registered_by,
        register_time=_timestamp(device.registered_at),
        secret_generation=device.secret_generation,
        secret_registered_by=device.secret_registered_by or "",
        reprovisioned_under=f"approvals/{device.reprovisioned_under}" if device.reprovisioned_under else "",
    )
    if device.secret_registered_at is not None:
        message.secret_register_time.CopyFrom(_timestamp(device.secret_registered_at))
    if device.reprovision_until is not None and device.open_for_reprovisioning(now):
        message.reprovision_until.CopyFrom(_timestamp(device.reprovision_until))
    return message


def _reprovisioned_resource(device_ids: list[str]) -> str:
    """The audit resource of a registration stream that re-provisioned ``device_ids`` (at least one): the
    first, and how many more (device ids are at most 64 characters, well within a record's text field)."""
    more = len(device_ids) - 1
    return f"devices/{device_ids[0]}" + (f" (+{more} re-provisioned)" if more else "")


def _outcome_pb(row: int, device_id: str, outcome: Registration | KmsError) -> devices_pb2.RowOutcome:
    if isinstance(outcome, KmsError):
        return devices_pb2.RowOutcome(
            row=row,
            device_id=device_id,
            status=devices_pb2.RowOutcome.REJECTED,
            code=status_of(outcome).value[0],
            message=str(outcome),
        )
    return devices_pb2.RowOutcome(row=row, device_id=device_id, status=_OUTCOMES[outcome])


class DeviceRegistryServicer(devices_pb2_grpc.DeviceRegistryServiceServicer):
    def __init__(self, registry: DeviceRegistry) -> None:
        self._registry = registry

    @translate_errors
    def GetRegistrationKey(  # noqa: N802 - gRPC method name
        self, request: devices_pb2.GetRegistrationKeyRequest, context: grpc.ServicerContext
    ) -> devices_pb2.RegistrationKey:
        note(product=request.product)
        version = self._registry.registration_key(request.product, caller_of(context))
        note(key_version=version.name)
        return devices_pb2.RegistrationKey(key_version=version.name, pem=version.public_key_pem)

    @translate_errors
    def RegisterDevices(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterable[devices_pb2.RegisterDevicesRequest], context: grpc.ServicerContext
    ) -> Iterator[devices_pb2.RegisterDevicesResponse]:
        caller = caller_of(context)
        stream = iter(request_iterator)
        first = next(stream, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument(
                "the first RegisterDevices message must carry the header (product, transport)"
            )
        header = first.header
        note(product=header.product, key_version=header.transport_key_version)
        self._registry.open_stream(caller, header.product)
        transport: TransportBatch | None = None
        if header.transport_key_version:
            transport = self._registry.transport_batch(
                header.product, header.transport_key_version, header.wrapped_batch_key
            )
        elif header.wrapped_batch_key:
            raise InvalidArgument("wrapped_batch_key needs transport_key_version")
        reprovisioned: list[str] = []  # replacing a secret is named in the call's audit record
        for message in stream:
            if message.WhichOneof("part") != "devices":
                raise InvalidArgument("only the first RegisterDevices message may carry a header")
            rows = [
                RegistrationRow(r.row, r.device_id, r.chip, r.secret, r.ecies_public_key)
                for r in message.devices.rows
            ]
            results = self._registry.register(caller, header.product, rows, transport)  # committed
            replaced = [r.device_id for r in results if r.outcome is Registration.REPROVISIONED]
            if replaced:
                reprovisioned += replaced
                note(resource=_reprovisioned_resource(reprovisioned))
            yield devices_pb2.RegisterDevicesResponse(
                outcomes=[_outcome_pb(r.row, r.device_id, r.outcome) for r in results]
            )

    @translate_errors
    def GetDevice(  # noqa: N802 - gRPC method name
        self, request: devices_pb2.GetDeviceRequest, context: grpc.ServicerContext
    ) -> devices_pb2.DeviceInfo:
        note(resource=f"devices/{request.device_id}")
        return device_pb(self._registry.get(request.device_id, caller_of(context)), _utc_now())

    @translate_errors
    def RevokeDevice(  # noqa: N802 - gRPC method name
        self, request: devices_pb2.RevokeDeviceRequest, context: grpc.ServicerContext
    ) -> devices_pb2.DeviceInfo:
        note(resource=f"devices/{request.device_id}")
        return device_pb(self._registry.revoke(caller_of(context), request.device_id), _utc_now())


class ReprovisionDevice:
    """The act of opening a device for re-provisioning (a ``GatedAct``, see approval_servicers)."""

    def __init__(self, reprovisioning: DeviceReprovisioning) -> None:
        self._reprovisioning = reprovisioning

    def prepare(
        self, caller: Caller, message: approvals_pb2.RequestDeviceReprovisioningRequest
    ) -> tuple[str, dict[str, str]]:
        reason = message.reason.strip()
        if not reason:
            raise InvalidArgument("a re-provisioning request needs a reason (why the secret must change)")
        if len(reason) > MAX_PARAMETER_LENGTH:
            raise InvalidArgument(f"the reason has at most {MAX_PARAMETER_LENGTH} characters")
        device = self._reprovisioning.check_request(caller, message.device_id)
        note(product=device.product)
        return f"devices/{device.device_id}", {REASON_PARAMETER: reason, PRODUCT_PARAMETER: device.product}

    def execute(self, caller: Caller, request: ApprovalRequest) -> approvals_pb2.ExecuteRequestResponse:
        device_id = request.target.removeprefix("devices/")
        if device_id == request.target:
            raise FailedPrecondition(
                f"approval request {request.id} does not name a device: {request.target!r}"
            )
        device = self._reprovisioning.open(caller, device_id, request.expires_at, request.id)
        note(product=device.product)
        return approvals_pb2.ExecuteRequestResponse(device=device_pb(device, _utc_now()))


class DistributionServicer(devices_pb2_grpc.DistributionServiceServicer):
    def __init__(self, distribution: Distribution) -> None:
        self._distribution = distribution

    @translate_errors
    def GetPayload(  # noqa: N802 - gRPC method name
        self, request: devices_pb2.GetPayloadRequest, context: grpc.ServicerContext
    ) -> Iterator[devices_pb2.GetPayloadResponse]:
        note(resource=f"devices/{request.device_id}/{request.release}")
        payload_format = FORMATS.get(request.format)
        if payload_format is None:
            raise InvalidArgument(f"unknown payload format {request.format}")
        if request.segment_size and payload_format is not PayloadFormat.FKSP_V1:
            raise InvalidArgument("segment_size applies to the FKSP_V1 format only")
        payload = self._distribution.payload(
            caller_of(context),
            request.device_id,
            request.release,
            payload_format,
            segment_size=request.segment_size or DEFAULT_SEGMENT_SIZE,
            device_secure_version=(
                request.device_secure_version if request.HasField("device_secure_version") else None
            ),
        )
        note(product=payload.release.product, key_version=payload.manifest_key_version)
        chunks = payload.iter_bytes(request.offset, PAYLOAD_CHUNK)  # OUT_OF_RANGE before any message
        yield devices_pb2.GetPayloadResponse(
            info=devices_pb2.PayloadInfo(
                format=FORMATS_PB[payload.format],
                total_size=payload.total_size,
                offset=request.offset,
                device_id=payload.device.device_id,
                release=payload.release.name,
                secure_version=payload.release.secure_version,
                segment_size=payload.segment_size,
                manifest_key_version=payload.manifest_key_version,
            )
        )
        for chunk in chunks:
            yield devices_pb2.GetPayloadResponse(chunk=chunk)
