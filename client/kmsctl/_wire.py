"""The boundary with the generated protobuf and gRPC code: method paths, status and message conversions.

Everything that knows a protobuf field name or a gRPC status code sits here, so the rest of the library
works with ``kmsctl._models`` values and ``kmsctl.errors`` exceptions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import google_crc32c
import grpc

from kmsapi.v1 import common_pb2, devices_pb2, keys_pb2, signing_pb2
from kmsctl import errors
from kmsctl._models import (
    Algorithm,
    DeviceInfo,
    DeviceState,
    EncodingName,
    KeyInfo,
    KeyPurpose,
    KeyVersionInfo,
    KeyVersionState,
    PayloadFormat,
    PayloadFormatName,
    PayloadInfo,
    RegistrationStatus,
    Release,
    RowOutcome,
)


def method_path(file_descriptor: Any, service: str, method: str) -> str:
    """The HTTP/2 path of an RPC, e.g. ``/kmsapi.v1.SigningService/SignImage``, read from the descriptor
    so it cannot drift from the protos."""
    service_descriptor = file_descriptor.services_by_name[service]
    return f"/{service_descriptor.full_name}/{service_descriptor.methods_by_name[method].name}"


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) as Google Cloud KMS and this API use it."""
    return int(google_crc32c.value(data))


_ERRORS: dict[grpc.StatusCode, type[errors.KmsClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: errors.UnimplementedError,
    grpc.StatusCode.DATA_LOSS: errors.DataLossError,
}


def translate(error: grpc.RpcError) -> errors.KmsClientError:
    """The ``KmsClientError`` for a failed call, carrying the server's message and the status name.
    The caller raises it ``from error``."""
    status = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = error.details() if isinstance(error, grpc.Call) else None
    name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
    return _ERRORS.get(status, errors.ServerError)(details or name, code=name)


_ALGORITHMS: dict[int, Algorithm] = {
    common_pb2.ECDSA_P256_SHA256: Algorithm.ECDSA_P256_SHA256,
    common_pb2.ECDSA_P384_SHA384: Algorithm.ECDSA_P384_SHA384,
    common_pb2.RSA_3072_PSS_SHA256: Algorithm.RSA_3072_PSS_SHA256,
}
_PURPOSES: dict[int, KeyPurpose] = {
    common_pb2.SECURE_BOOT_V2: KeyPurpose.SECURE_BOOT_V2,
    common_pb2.DIGEST_SIGNING: KeyPurpose.DIGEST_SIGNING,
}
_STATES: dict[int, KeyVersionState] = {
    common_pb2.ENABLED: KeyVersionState.ENABLED,
    common_pb2.DISABLED: KeyVersionState.DISABLED,
    common_pb2.DESTROY_SCHEDULED: KeyVersionState.DESTROY_SCHEDULED,
    common_pb2.DESTROYED: KeyVersionState.DESTROYED,
}
ENCODINGS: dict[EncodingName, common_pb2.SignatureEncoding.ValueType] = {
    "raw": common_pb2.RAW,
    "der": common_pb2.DER,
}


def encoding(value: int) -> EncodingName | None:
    """The encoding of a returned signature; UNSPECIFIED means RAW, as in requests."""
    if value == common_pb2.SIGNATURE_ENCODING_UNSPECIFIED:
        return "raw"
    return next((name for name, number in ENCODINGS.items() if number == value), None)


def algorithm(value: int) -> Algorithm:
    return _ALGORITHMS.get(value, Algorithm.UNSPECIFIED)


def _timestamp(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value


def release(message: signing_pb2.Release) -> Release:
    return Release(
        name=message.name,
        product=message.product,
        chip=message.chip,
        version=message.version,
        secure_version=message.secure_version,
        project_name=message.project_name,
        input_sha256=message.input_sha256,
        output_sha256=message.output_sha256,
        output_size=message.output_size,
        key_versions=tuple(message.key_versions),
        signed_by=message.signed_by,
        create_time=_timestamp(message, "create_time"),
        reused=message.reused,
    )


def key(message: keys_pb2.Key) -> KeyInfo:
    purpose = _PURPOSES.get(message.purpose, KeyPurpose.UNSPECIFIED)
    in_slot = purpose is KeyPurpose.SECURE_BOOT_V2 and message.sbv2_slot >= 0
    return KeyInfo(
        name=message.name,
        product=message.product,
        purpose=purpose,
        algorithm=algorithm(message.algorithm),
        sbv2_slot=message.sbv2_slot if in_slot else None,
        primary_version=message.primary_version,
        versions=tuple(
            KeyVersionInfo(
                name=version.name,
                state=_STATES.get(version.state, KeyVersionState.UNSPECIFIED),
                create_time=_timestamp(version, "create_time"),
            )
            for version in message.versions
        ),
    )


# -- devices and payloads ----------------------------------------------------------------------------------

_STATUS_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}
_ROW_STATUSES: dict[int, RegistrationStatus] = {
    devices_pb2.RowOutcome.CREATED: RegistrationStatus.CREATED,
    devices_pb2.RowOutcome.UNCHANGED: RegistrationStatus.UNCHANGED,
    devices_pb2.RowOutcome.REJECTED: RegistrationStatus.REJECTED,
    devices_pb2.RowOutcome.REPROVISIONED: RegistrationStatus.REPROVISIONED,
}
_DEVICE_STATES = {"active": DeviceState.ACTIVE, "revoked": DeviceState.REVOKED}
PAYLOAD_FORMATS: dict[PayloadFormatName, devices_pb2.PayloadFormat.ValueType] = {
    "fksp": devices_pb2.FKSP_V1,
    "esp-encrypted-img": devices_pb2.ESP_ENCRYPTED_IMG_ECIES,
}
_PAYLOAD_FORMATS: dict[int, PayloadFormat] = {
    devices_pb2.PAYLOAD_FORMAT_UNSPECIFIED: PayloadFormat.FKSP_V1,  # the proto's default
    devices_pb2.FKSP_V1: PayloadFormat.FKSP_V1,
    devices_pb2.ESP_ENCRYPTED_IMG_ECIES: PayloadFormat.ESP_ENCRYPTED_IMG_ECIES,
}


def payload_format(value: int) -> PayloadFormat:
    return _PAYLOAD_FORMATS.get(value, PayloadFormat.UNSPECIFIED)


def status_name(code: int) -> str:
    """``"ALREADY_EXISTS"`` for 6: the google.rpc.Code name of a number a message carries."""
    return _STATUS_NAMES.get(code, f"CODE_{code}")


def row_outcome(message: devices_pb2.RowOutcome) -> RowOutcome:
    status = _ROW_STATUSES.get(message.status, RegistrationStatus.UNSPECIFIED)
    rejected = status is RegistrationStatus.REJECTED
    return RowOutcome(
        row=message.row,
        device_id=message.device_id,
        status=status,
        code=status_name(message.code) if rejected else "",
        message=message.message if rejected else "",
    )


def device_info(message: devices_pb2.DeviceInfo) -> DeviceInfo:
    return DeviceInfo(
        device_id=message.device_id,
        product=message.product,
        chip=message.chip,
        state=_DEVICE_STATES.get(message.state, DeviceState.UNSPECIFIED),
        kek_version=message.kek_version,
        has_ecies_public_key=message.has_ecies_public_key,
        registered_by=message.registered_by,
        register_time=_timestamp(message, "register_time"),
        secret_generation=message.secret_generation,
        reprovision_until=_timestamp(message, "reprovision_until"),
        secret_registered_by=message.secret_registered_by,
        secret_register_time=_timestamp(message, "secret_register_time"),
        reprovisioned_under=message.reprovisioned_under,
    )


def payload_info(message: devices_pb2.PayloadInfo) -> PayloadInfo:
    return PayloadInfo(
        format=payload_format(message.format),
        total_size=message.total_size,
        device_id=message.device_id,
        release=message.release,
        secure_version=message.secure_version,
        segment_size=message.segment_size,
        manifest_key_version=message.manifest_key_version,
    )
