"""kmsctl: the client library and command-line tool for the firmware KMS: build servers sign firmware,
factory stations register devices with their eFuse secrets, distribution servers fetch per-device payloads.

The library talks to the service over gRPC with mutual TLS::

    from kmsctl import KmsClient

    with KmsClient.from_files("kms.example:50051", ca="ca.pem", cert="ci.pem", key="ci.key") as kms:
        signed = kms.sign_image("thermostat", "build/app.bin", output="build/app-signed.bin")
        print(signed.release.name, signed.release.key_versions)
        signature = kms.sign_digest("keys/artifacts", hashlib.sha256(data).digest(), encoding="der")
        efuse_digest = kms.get_public_key("keys/thermostat-sb0").sbv2_key_digest

    with KmsClient.from_files(..., cert="factory-registrar.pem", key="factory-registrar.key") as kms:
        rows = (DeviceRegistration(mac, "esp32s3", secret) for mac, secret in burned_devices())
        summary = kms.register_devices("thermostat", rows)  # secrets wrapped for the HSM
        print(summary.created, summary.unchanged, [(r.row, r.code) for r in summary.rejected])

    with KmsClient.from_files(..., cert="distribution-server.pem", key="distribution-server.key") as kms:
        kms.get_payload("24:6f:28:aa:bb:cc", release.name, output="ota.fksp", resume=True)

Every call has a deadline and is retried with exponential backoff on UNAVAILABLE only; the long streams
(device registration, payload download) have an idle deadline instead and resume where they broke.
Responses are checked on the client (CRC32C of digests, signatures and PEMs; size and SHA-256 of signed
images; the Secure Boot V2 key digest recomputed from the public key; payload sizes and headers); a failed
check raises ``IntegrityError``. Every error is a ``KmsClientError`` (see ``kmsctl.errors``). The
command-line tool is ``kmsctl.cli``.

Everything public is importable from here; modules whose names start with ``_`` may change. ``KmsClient``
and the message-size constants are imported on first use, so that importing ``kmsctl`` (and starting the
CLI) does not load gRPC: the CLI sets ``GRPC_VERBOSITY`` first, which gRPC reads only when it is loaded.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kmsctl._files import ImageInput
from kmsctl._models import (
    Algorithm,
    DeviceInfo,
    DeviceRegistration,
    DeviceState,
    DigestSignature,
    EncodingName,
    HashName,
    KeyInfo,
    KeyPurpose,
    KeyVersionInfo,
    KeyVersionState,
    PayloadDownload,
    PayloadFormat,
    PayloadFormatName,
    PayloadInfo,
    ProgressCallback,
    PublicKeyInfo,
    RegistrationKeyInfo,
    RegistrationStatus,
    RegistrationSummary,
    Release,
    RowOutcome,
    RowOutcomeCallback,
    RowProgressCallback,
    SignedImage,
    TransportName,
)
from kmsctl._retry import RetryPolicy
from kmsctl._sbv2 import sbv2_key_digest
from kmsctl.errors import (
    AlreadyExistsError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    KmsClientError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)

if TYPE_CHECKING:
    from kmsctl._client import (
        MAX_RECEIVE_MESSAGE_BYTES,
        MAX_SEND_MESSAGE_BYTES,
        UPLOAD_CHUNK_SIZE,
        KmsClient,
    )

_LAZY = {"KmsClient", "MAX_RECEIVE_MESSAGE_BYTES", "MAX_SEND_MESSAGE_BYTES", "UPLOAD_CHUNK_SIZE"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module("kmsctl._client"), name)
    raise AttributeError(f"module 'kmsctl' has no attribute {name!r}")


__all__ = [
    "MAX_RECEIVE_MESSAGE_BYTES",
    "MAX_SEND_MESSAGE_BYTES",
    "UPLOAD_CHUNK_SIZE",
    "Algorithm",
    "AlreadyExistsError",
    "DataLossError",
    "DeadlineExceededError",
    "DeviceInfo",
    "DeviceRegistration",
    "DeviceState",
    "DigestSignature",
    "EncodingName",
    "FailedPreconditionError",
    "HashName",
    "ImageInput",
    "IntegrityError",
    "InvalidArgumentError",
    "KeyInfo",
    "KeyPurpose",
    "KeyVersionInfo",
    "KeyVersionState",
    "KmsClient",
    "KmsClientError",
    "NotFoundError",
    "PayloadDownload",
    "PayloadFormat",
    "PayloadFormatName",
    "PayloadInfo",
    "PermissionDeniedError",
    "ProgressCallback",
    "PublicKeyInfo",
    "RegistrationKeyInfo",
    "RegistrationStatus",
    "RegistrationSummary",
    "Release",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RowOutcome",
    "RowOutcomeCallback",
    "RowProgressCallback",
    "ServerError",
    "SignedImage",
    "TransportName",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "sbv2_key_digest",
]
