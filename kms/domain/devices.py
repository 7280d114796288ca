"""Devices and their eFuse secrets, as the registry knows them.

A device is registered by a factory station with the 32-byte secret burned into one of its eFuse key blocks
(purpose ``HMAC_UP``). The registry never stores or returns that secret in plaintext: it keeps it wrapped
under the product's key-encryption key (KEK) inside the HSM (``WrappedSecret``), together with the wrap
mechanism and the KEK version, and a *fingerprint*: one HMAC-SHA256 keyed by the secret itself over a
label no payload key derivation uses (``FINGERPRINT_LABEL``), computed inside the HSM. The fingerprint lets
the registry tell "the same device registered again with the same secret" (a no-op) from "a different secret"
(ALREADY_EXISTS) without unwrapping anything, and survives KEK rotation.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import datetime

from kms.domain.errors import InvalidArgument

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


def validate_device_id(device_id: str) -> str:
    """Device ids are 1-64 printable ASCII characters without spaces (e.g. the base MAC, a serial)."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise InvalidArgument(
            f"malformed device id {device_id[:80]!r}: "
            f"use 1-{DEVICE_ID_MAX} printable ASCII characters, no spaces"
        )
    return device_id
