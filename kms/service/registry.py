"""The device registry: factory stations register devices with their eFuse secrets; officers revoke them.

A registration batch is validated row by row (a malformed row is reported with its row number, and the
valid rows of the batch are kept), the secrets of the valid rows are imported into the HSM in one call
(wrapped under the product's KEK; with the transport path they are unwrapped only inside the HSM), and the
batch is committed in one transaction before anything is acknowledged.

A known device id with a different secret is refused (ALREADY_EXISTS) unless officers opened the device for
re-provisioning (``kms.service.reprovisioning``): then the row replaces the stored secret and is reported
REPROVISIONED. Each row is built as a new device registered now; the store decides, with the rules of
``kms.domain.devices.registration_outcome``, what it does to the device already registered under that id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kms.domain import chips
from kms.domain.devices import (
    FINGERPRINT_LABEL,
    SECRET_SIZE,
    Device,
    DeviceState,
    Registration,
    WrappedSecret,
    validate_device_id,
)
from kms.domain.errors import FailedPrecondition, InvalidArgument, KmsError, LimitExceeded, NotFound
from kms.domain.esp_encrypted_img import normalize_device_public_key
from kms.domain.identity import Caller
from kms.domain.keys import Key, KeyPurpose, KeyVersion, KeyVersionState, validate_product
from kms.domain.policy import require_product
from kms.domain.ports import DeviceRepository, Hsm, KeyRepository, SignatureLog, TransportBatch
from kms.domain.releases import SignatureRecord

MAX_ROWS_PER_BATCH = 1000
WRAPPED_SECRET_SIZE = 40  # RFC 3394 key wrap of 32 bytes: 8-byte integrity block + 32 bytes


@dataclass(frozen=True)
class RegistrationRow:
    row: int
    device_id: str
    chip: str
    secret: bytes = field(repr=False)  # plaintext on the mTLS path: never in a repr, log or message
    ecies_public_key: bytes = b""


@dataclass(frozen=True)
class RowResult:
    row: int
    device_id: str
    outcome: Registration | KmsError


def primary_key_of(keys: KeyRepository, product: str, purpose: KeyPurpose) -> tuple[Key, KeyVersion]:
    """The product's key of ``purpose`` and its primary version, which must be enabled."""
    candidates = [k for k in keys.list_keys(product) if k.purpose is purpose]
    if not candidates:
        raise FailedPrecondition(
            f"product {product!r} has no {purpose.value} key; a security officer creates one with "
            f"'kms keys create --product {product} --purpose {purpose.value} ...'"
        )
    key = candidates[0]
    version = key.version()
    if version.state is not KeyVersionState.ENABLED:
        raise FailedPrecondition(f"the primary version {version.name} of {key.name} is {version.state.value}")
    return key, version


class DeviceRegistry:
    def __init__(
        self,
        hsm: Hsm,
        keys: KeyRepository,
        devices: DeviceRepository,
        signature_log: SignatureLog,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._hsm = hsm
        self._keys = keys
        self._devices = devices
        self._log = signature_log
        self._clock = clock

    def registration_key(self, product: str, caller: Caller) -> KeyVersion:
        validate_product(product)
        require_product(caller, product)
        return primary_key_of(self._keys, product, KeyPurpose.REGISTRATION_TRANSPORT)[1]

    def open_stream(self, caller: Caller, product: str) -> None:
        """Refuse a registration stream for a product out of ``caller``'s scope at its header, before any
        row is read (``register`` checks again for every batch)."""
        validate_product(product)
        require_product(caller, product)

    def transport_batch(self, product: str, key_version: str, wrapped_batch_key: bytes) -> TransportBatch:
        """Check the header of a wrapped registration stream; the key must be the product's transport key."""
        _key, version = primary_key_of(self._keys, product, KeyPurpose.REGISTRATION_TRANSPORT)
        if key_version != version.name:
            raise FailedPrecondition(
                f"{key_version!r} is not the current registration key of product {product!r} "
                f"({version.name}); fetch it again with GetRegistrationKey"
            )
        if len(wrapped_batch_key) != 384:
            raise InvalidArgument("wrapped_batch_key must be an RSA-3072 OAEP ciphertext of 384 bytes")
        return TransportBatch(version.hsm_id, wrapped_batch_key, version.name)

    def register(
        self, caller: Caller, product: str, rows: Sequence[RegistrationRow], transport: TransportBatch | None
    ) -> list[RowResult]:
        validate_product(product)
        require_product(caller, product)
        if len(rows) > MAX_ROWS_PER_BATCH:
            raise LimitExceeded(f"at most {MAX_ROWS_PER_BATCH} rows per message; got {len(rows)}")
        kek_key, kek = primary_key_of(self._keys, product, KeyPurpose.KEY_ENCRYPTION)
        secret_size = SECRET_SIZE if transport is None else WRAPPED_SECRET_SIZE
        results: dict[int, RowResult] = {}
        valid: list[tuple[int, RegistrationRow, str, bytes | None]] = []
        seen: set[str] = set()
        for index, row in enumerate(rows):
            try:
                validate_device_id(row.device_id)
                chip = chips.chip_by_name(row.chip).name
                if len(row.secret) != secret_size:
                    how = "plaintext" if transport is None else "wrapped (RFC 3394)"
                    raise InvalidArgument(
                        f"the {how} secret must be {secret_size} bytes, not {len(row.secret)}"
                    )
                ecies = _ecies_point(row.ecies_public_key)
                if row.device_id in seen:
                    raise InvalidArgument(f"device {row.device_id!r} appears twice in the same message")
                seen.add(row.device_id)
            except KmsError as e:
                results[index] = RowResult(row.row, row.device_id, e)
                continue
            valid.append((index, row, chip, ecies))

        imported = self._hsm.import_secrets(
            kek.hsm_id,
            [r.secret for _, r, _, _ in valid],
            transport=transport,
            fingerprint_message=FINGERPRINT_LABEL,
        )
        now = self._clock()
        if valid:  # the KEK (and the transport key) were used: recorded before anything is acknowledged
            ids = "\n".join(row.device_id for _, row, _, _ in valid).encode()
            subject = f"{len(valid)} device secrets of {product}"
            used = [kek.name] + ([transport.key_version] if transport is not None else [])
            for key_version in used:
                self._log.append(
                    SignatureRecord(
                        caller.identity,
                        "import-device-secrets",
                        key_version,
                        hashlib.sha256(ids).digest(),
                        subject,
                        now,
                    )
                )
        to_store: list[tuple[int, Device]] = []
        for (index, row, chip, ecies), secret in zip(valid, imported, strict=True):
            if isinstance(secret, KmsError):
                results[index] = RowResult(row.row, row.device_id, secret)
                continue
            device = Device(
                device_id=row.device_id,
                product=product,
                chip=chip,
                state=DeviceState.ACTIVE,
                secret=WrappedSecret(kek_key.key_id, kek.version, secret.mechanism, secret.wrapped),
                fingerprint=secret.fingerprint,
                registered_by=caller.identity,
                registered_at=now,
                ecies_public_key=ecies,
            )
            to_store.append((index, device))
        outcomes = self._devices.add_many([d for _, d in to_store])
        for (index, device), outcome in zip(to_store, outcomes, strict=True):
            results[index] = RowResult(rows[index].row, device.device_id, outcome)
        return [results[i] for i in range(len(rows))]

    def get(self, device_id: str, caller: Caller) -> Device:
        device = self._devices.get(validate_device_id(device_id))
        require_product(caller, device.product)
        return device

    def revoke(self, caller: Caller, device_id: str) -> Device:
        require_product(caller, self._devices.get(validate_device_id(device_id)).product)
        return self._devices.revoke(validate_device_id(device_id), self._clock())


def _ecies_point(key: bytes) -> bytes | None:
    """X||Y (64 bytes) of an esp_encrypted_img device key given as X||Y, SEC1 or DER; None if absent."""
    if not key:
        return None
    return normalize_device_public_key(b"\x04" + key if len(key) == 64 else key)[1:]


def kek_hsm_id(keys: KeyRepository, device: Device) -> bytes:
    """The HSM id of the KEK version a device's secret is wrapped under; it must be enabled."""
    try:
        version = keys.get_key(device.secret.kek_key_id).version(device.secret.kek_version)
    except (LookupError, NotFound):
        raise FailedPrecondition(
            f"the key-encryption key of device {device.device_id!r} is missing"
        ) from None
    if version.state is not KeyVersionState.ENABLED:
        raise FailedPrecondition(
            f"the key-encryption key {version.name} of device {device.device_id!r} is {version.state.value}; "
            "only enabled versions unwrap"
        )
    return version.hsm_id
