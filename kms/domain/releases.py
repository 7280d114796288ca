"""Releases: firmware images the service has signed, and records of every key use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kms.domain.errors import FailedPrecondition


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
    """Anti-rollback at signing: refuse a secure_version below the product's floor (highest signed so far)."""
    if floor is not None and secure_version < floor:
        raise FailedPrecondition(
            f"anti-rollback: image secure_version {secure_version} is below product {product!r}'s "
            f"floor {floor} (the highest secure_version signed so far); "
            f"build with secure_version >= {floor}"
        )


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
