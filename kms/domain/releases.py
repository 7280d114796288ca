"""Releases: firmware images the service has signed, records of every key use, and anti-rollback floors.

The anti-rollback floor of a product is the lowest secure_version the service still signs. It rises by
itself to the highest secure_version signed (``check_floor`` refuses anything below it). Lowering it is an
act under dual control (``kms.domain.approvals``): a lower floor lets an older, perhaps vulnerable, release be
signed again, so officers decide it on what they saw when they approved. ``FloorLowering`` therefore carries
the floor the request saw (``from_secure_version``) and ``check_lowering`` refuses at execution if the floor
moved meanwhile: a release signed in between may be the very fix the lowering would undo.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from kms.domain.errors import FailedPrecondition, InvalidArgument

MAX_SECURE_VERSION = 2**32 - 1  # esp_app_desc_t.secure_version is a uint32_t


@dataclass(frozen=True)
class Release:
    """A signed image. The signed bytes live in the content-addressed store under ``output_sha256``."""

    product: str
    chip: str
    version: str
    secure_version: int
    project_name: str
    input_sha256: bytes
    output_sha256: bytes
    output_size: int
    key_versions: tuple[str, ...]
    signed_by: str
    created_at: datetime

    @property
    def name(self) -> str:
        return f"releases/{self.output_sha256.hex()}"


def check_floor(product: str, secure_version: int, floor: int | None) -> None:
    """Anti-rollback at signing: refuse a secure_version below the product's floor (highest signed so far,
    unless officers lowered it since)."""
    if floor is not None and secure_version < floor:
        raise FailedPrecondition(
            f"anti-rollback: image secure_version {secure_version} is below the floor {floor} of "
            f"product {product!r} (the highest secure_version signed so far, unless officers lowered it); "
            f"build with secure_version >= {floor}"
        )


@dataclass(frozen=True)
class RollbackFloor:
    """A product's anti-rollback floor (None before its first release) and its last lowering, if any."""

    product: str
    secure_version: int | None
    lowered_at: datetime | None = None
    lowered_by: str | None = None  # the officer who executed the last lowering
    lowering_request: str | None = None  # the id of its approval request


@dataclass(frozen=True)
class FloorLowering:
    """An approved lowering of ``product``'s floor from ``from_secure_version`` (the floor the request saw)
    to ``to_secure_version``, executed by ``officer`` under approval request ``request_id``."""

    product: str
    from_secure_version: int
    to_secure_version: int
    officer: str
    request_id: str
    at: datetime


def check_lowering(product: str, current: int | None, new: int) -> int:
    """The current floor, if lowering it to ``new`` is allowed: the product has a floor and ``new`` is
    below it. ``FailedPrecondition`` without a floor, ``InvalidArgument`` for a ``new`` that is not lower."""
    if not 0 <= new <= MAX_SECURE_VERSION:
        raise InvalidArgument(f"secure_version {new} is out of range (0 to {MAX_SECURE_VERSION})")
    if current is None:
        raise FailedPrecondition(
            f"product {product!r} has no anti-rollback floor to lower: nothing was signed for it yet"
        )
    if new >= current:
        raise InvalidArgument(
            f"the new floor {new} must be below the current floor {current} of product {product!r}; "
            "the floor rises by itself when a higher secure_version is signed"
        )
    return current


def check_floor_unmoved(lowering: FloorLowering, current: int | None) -> None:
    """At execution: refuse (``FailedPrecondition``) unless the floor is still the one the request saw."""
    if current != lowering.from_secure_version:
        now = "has no floor" if current is None else f"is now at {current}"
        raise FailedPrecondition(
            f"the anti-rollback floor of product {lowering.product!r} {now}, not at "
            f"{lowering.from_secure_version} as when the lowering was requested; the officers approved "
            "another change: reject this request and request the lowering again if it is still wanted"
        )
    check_lowering(lowering.product, current, lowering.to_secure_version)


class FloorRepository(Protocol):
    """Where floors live (``kms.store.releases``)."""

    def rollback_floor(self, product: str) -> RollbackFloor:
        """The product's floor now, with its last lowering."""
        ...

    def lower_floor(self, lowering: FloorLowering) -> RollbackFloor:
        """In one transaction: ``check_floor_unmoved``, set the floor, record the lowering; the new floor."""
        ...


@dataclass(frozen=True)
class SignatureRecord:
    """One use of a private key, attributable to an authenticated caller.

    ``operation`` is "sign-image" or "sign-digest"; ``subject`` is what was signed: the release name for an
    image, the hex digest for a digest signature.
    """

    caller: str
    operation: str
    key_version: str
    digest: bytes
    subject: str
    created_at: datetime
