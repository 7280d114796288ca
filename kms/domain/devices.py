"""Devices and their eFuse secrets, as the registry knows them.

A device is registered by a factory station with the 32-byte secret burned into one of its eFuse key blocks
(purpose ``HMAC_UP``). The registry never stores or returns that secret in plaintext: it keeps it wrapped
under the product's key-encryption key (KEK) inside the HSM (``WrappedSecret``), together with the wrap
mechanism and the KEK version, and a *fingerprint*: one HMAC-SHA256 keyed by the secret itself over a
label no payload key derivation uses (``FINGERPRINT_LABEL``), computed inside the HSM. The fingerprint lets
the registry tell "the same device registered again with the same secret" (a no-op) from "a different secret"
(ALREADY_EXISTS) without unwrapping anything, and survives KEK rotation.

Re-provisioning (a device whose secret must be replaced, e.g. after a repair that burned a new eFuse key
block) is an act under dual control: once officers approved and executed a request for the device
(``ApprovalService.RequestDeviceReprovisioning``), the device is *open for re-provisioning* until the
request's expiry (``reprovision_until``). While open, the next registration of that device id with a
different secret replaces the stored one (``registration_outcome`` says REPROVISIONED; ``reprovisioned``
builds the device), increments ``secret_generation`` and closes the window; the same secret again is
UNCHANGED and leaves it open. The ECIES public key (esp_encrypted_img) is derived from the eFuse secret on
the device, so the old one is never kept: the re-provisioning row's key (or none) replaces it. A revoked
device cannot be re-provisioned (``check_reprovisionable``); revoking closes an open window.

``registered_by``/``registered_at`` always name the first registration; who installed the *current* secret,
when, and under which approval request are ``secret_registered_by``/``secret_registered_at`` and
``reprovisioned_under``, so "who put this secret on device X" is answered by the device itself, not by
correlating audit records. For the first secret they equal the registration (filled in by ``Device``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from kms.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, KmsError

SECRET_SIZE = 32
DEVICE_ID_MAX = 64
FINGERPRINT_LABEL = b"FKSP/1 registration fingerprint\x00"
"""HMAC message for the secret's fingerprint. It cannot collide with a payload-key info string, which starts
with ``FKSP/1 payload key`` (docs/sealed-payload-v1.md)."""

_DEVICE_ID = re.compile(r"[\x21-\x7e]{1,64}")


class DeviceState(enum.Enum):
    ACTIVE = "active"
    REVOKED = "revoked"


class Registration(enum.Enum):
    """The outcome of registering one device that was not refused."""

    CREATED = "created"
    UNCHANGED = "unchanged"  # already registered with the same secret: a no-op
    REPROVISIONED = "reprovisioned"  # open for re-provisioning: a different secret replaced the stored one


@dataclass(frozen=True)
class WrappedSecret:
    """An eFuse secret wrapped under a KEK version inside the HSM. ``mechanism`` names the wrap exactly."""

    kek_key_id: str
    kek_version: int
    mechanism: str
    blob: bytes = field(repr=False)


@dataclass(frozen=True)
class Device:
    device_id: str
    product: str
    chip: str
    state: DeviceState
    secret: WrappedSecret
    fingerprint: bytes = field(repr=False)
    registered_by: str
    registered_at: datetime
    ecies_public_key: bytes | None = None  # X||Y of the esp_encrypted_img device key, 64 bytes, if registered
    secret_generation: int = 1  # 1 for the secret first registered, +1 per re-provisioning
    reprovision_until: datetime | None = None  # open for re-provisioning before this moment
    reprovision_request: str | None = None  # the approval request that opened it
    # Who registered the current secret and when: the registration for generation 1, the re-provisioning
    # registration after. None only for a secret re-provisioned before the registry recorded it (migration
    # 11 of kms.store.database).
    secret_registered_by: str | None = None
    secret_registered_at: datetime | None = None
    reprovisioned_under: str | None = None  # the request that admitted the current secret; None: generation 1

    def __post_init__(self) -> None:
        # The first secret is the registrar's: constructors of a new registration need not repeat it.
        if self.secret_generation == 1 and self.secret_registered_by is None:
            object.__setattr__(self, "secret_registered_by", self.registered_by)
        if self.secret_generation == 1 and self.secret_registered_at is None:
            object.__setattr__(self, "secret_registered_at", self.registered_at)

    def open_for_reprovisioning(self, now: datetime) -> bool:
        return (
            self.state is DeviceState.ACTIVE
            and self.reprovision_until is not None
            and now < self.reprovision_until
        )


def validate_device_id(device_id: str) -> str:
    """Device ids are 1-64 printable ASCII characters without spaces (e.g. the base MAC, a serial)."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise InvalidArgument(
            f"malformed device id {device_id[:80]!r}: "
            f"use 1-{DEVICE_ID_MAX} printable ASCII characters, no spaces"
        )
    return device_id


def check_reprovisionable(device: Device) -> Device:
    """Refuse (``FailedPrecondition``) to open a revoked device for re-provisioning."""
    if device.state is not DeviceState.ACTIVE:
        raise FailedPrecondition(
            f"device {device.device_id!r} is {device.state.value}; a revoked device cannot be re-provisioned "
            "(register the hardware under a new device id)"
        )
    return device


def registration_outcome(existing: Device | None, candidate: Device) -> Registration | KmsError:
    """What registering ``candidate`` does given the ``existing`` device of that id; ``candidate``'s
    ``registered_at`` is the moment of this registration (it decides whether a window is still open)."""
    if existing is None:
        return Registration.CREATED
    if existing.fingerprint == candidate.fingerprint and existing.product == candidate.product:
        return Registration.UNCHANGED
    device_id = candidate.device_id
    if not existing.open_for_reprovisioning(candidate.registered_at):
        return AlreadyExists(
            f"device {device_id!r} is already registered with a different secret or product; replacing its "
            "secret needs an approved re-provisioning request of security officers "
            f"('kmsctl devices reprovision {device_id} --reason ...')"
        )
    if existing.product != candidate.product:
        return AlreadyExists(
            f"device {device_id!r} is registered for another product; re-provisioning replaces the secret "
            "and keeps the product: register it under its own product"
        )
    if existing.chip != candidate.chip:
        return FailedPrecondition(
            f"device {device_id!r} is registered as an {existing.chip}, not an {candidate.chip}; "
            "re-provisioning replaces the secret of the same device: check the chip of this row"
        )
    return Registration.REPROVISIONED


def reprovisioned(existing: Device, candidate: Device) -> Device:
    """``existing`` with ``candidate``'s secret (and ECIES key, derived from it), next generation, closed.

    The first registration (``registered_by``/``registered_at``) stays; ``candidate``'s registrar and moment
    become the current secret's, and the request that opened the window is kept as ``reprovisioned_under``.
    """
    return replace(
        existing,
        secret=candidate.secret,
        fingerprint=candidate.fingerprint,
        ecies_public_key=candidate.ecies_public_key,
        secret_generation=existing.secret_generation + 1,
        reprovision_until=None,
        reprovision_request=None,
        secret_registered_by=candidate.registered_by,
        secret_registered_at=candidate.registered_at,
        reprovisioned_under=existing.reprovision_request,
    )


class ReprovisioningRepository(Protocol):
    """The registry's part that opens devices for re-provisioning (``kms.store.devices``)."""

    def get(self, device_id: str) -> Device:
        """``NotFound`` if the device is not registered."""
        ...

    def open_reprovisioning(self, device_id: str, until: datetime, request_id: str) -> Device:
        """In one transaction: ``check_reprovisionable``, then open the window; the device afterwards."""
        ...
