"""gRPC servicers of the factory (DeviceRegistryService) and distribution (DistributionService) paths."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain.devices import Device, Registration
from kms.domain.errors import InvalidArgument, KmsError
from kms.domain.ports import TransportBatch
from kms.server.audit_interceptor import note
from kms.server.auth import caller_of
from kms.server.errors import status_of, translate_errors
from kms.service.distribution import DEFAULT_SEGMENT_SIZE, Distribution, PayloadFormat
from kms.service.registry import DeviceRegistry, RegistrationRow
from kmsapi.v1 import devices_pb2, devices_pb2_grpc

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


def device_pb(registry: DeviceRegistry, device: Device) -> devices_pb2.DeviceInfo:
    stamp = Timestamp()
    stamp.FromDatetime(device.registered_at)
    return devices_pb2.DeviceInfo(
        device_id=device.device_id,
        product=device.product,
        chip=device.chip,
        state=device.state.value,
        kek_version=registry.kek_version_name(device),
        has_ecies_public_key=device.ecies_public_key is not None,
        registered_by=device.registered_by,
        register_time=stamp,
    )


def _outcome_pb(row: int, device_id: str, outcome: Registration | KmsError) -> devices_pb2.RowOutcome:
    if isinstance(outcome, KmsError):
        return devices_pb2.RowOutcome(
            row=row,
            device_id=device_id,
            status=devices_pb2.RowOutcome.REJECTED,
            code=status_of(outcome).value[0],
            message=str(outcome),
        )
    status = (
        devices_pb2.RowOutcome.CREATED
        if outcome is Registration.CREATED
        else devices_pb2.RowOutcome.UNCHANGED
    )
    return devices_pb2.RowOutcome(row=row, device_id=device_id, status=status)


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
        transport: TransportBatch | None = None
        if header.transport_key_version:
            transport = self._registry.transport_batch(
                header.product, header.transport_key_version, header.wrapped_batch_key
            )
        elif header.wrapped_batch_key:
            raise InvalidArgument("wrapped_batch_key needs transport_key_version")
        for message in stream:
            if message.WhichOneof("part") != "devices":
                raise InvalidArgument("only the first RegisterDevices message may carry a header")
            rows = [
                RegistrationRow(r.row, r.device_id, r.chip, r.secret, r.ecies_public_key)
                for r in message.devices.rows
            ]
            results = self._registry.register(caller, header.product, rows, transport)
            yield devices_pb2.RegisterDevicesResponse(
                outcomes=[_outcome_pb(r.row, r.device_id, r.outcome) for r in results]
            )

    @translate_errors
    def GetDevice(  # noqa: N802 - gRPC method name
        self, request: devices_pb2.GetDeviceRequest, context: grpc.ServicerContext
    ) -> devices_pb2.DeviceInfo:
        note(resource=f"devices/{request.device_id}")
        return device_pb(self._registry, self._registry.get(request.device_id, caller_of(context)))

    @translate_errors
    def RevokeDevice(  # noqa: N802 - gRPC method name
        self, request: devices_pb2.RevokeDeviceRequest, context: grpc.ServicerContext
    ) -> devices_pb2.DeviceInfo:
        note(resource=f"devices/{request.device_id}")
        return device_pb(self._registry, self._registry.revoke(caller_of(context), request.device_id))


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
