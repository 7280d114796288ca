"""The interfaces through which the domain and the use cases reach the outside world.

Adapters implement them: ``kms.hsm`` (PKCS#11), ``kms.store`` (SQLite and files). Unit tests use fakes.
Implementations raise only ``kms.domain.errors`` exceptions; foreign exceptions are translated where they
enter, with the cause chained, and never reach a caller's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kms.domain.keys import Algorithm, Key, KeyVersion
from kms.domain.releases import Release, SignatureRecord


@dataclass(frozen=True)
class GeneratedKeyPair:
    """A key pair just generated inside the HSM: its handle id there, and its public half."""

    hsm_id: bytes
    public_key_der: bytes


class Hsm(Protocol):
    """Private-key operations. Private keys are generated inside and never leave."""

    def generate_key_pair(self, algorithm: Algorithm, label: str) -> GeneratedKeyPair:
        """Generate a sensitive, non-extractable key pair; ``label`` is informative (CKA_LABEL)."""
        ...

    def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        """Sign a digest already computed with ``algorithm.hash``.

        Returns the RAW encoding: r||s big-endian (ECDSA) or the big-endian RSA-PSS signature (SHA-256,
        MGF1-SHA-256, 32-byte salt). Raises ``HsmUnavailable`` when the HSM is unreachable and
        ``HsmFailure`` when the key is missing or the operation is refused.
        """
        ...

    def destroy_key_pair(self, hsm_id: bytes) -> None:
        """Destroy both halves of a key pair. Idempotent."""
        ...

    def is_available(self) -> bool:
        """True if the HSM answers now (used by the health service)."""
        ...


class KeyRepository(Protocol):
    def add_key(self, key: Key) -> None:
        """Store a new key with its versions. ``AlreadyExists`` if the key id or SBv2 slot is taken."""
        ...

    def get_key(self, key_id: str) -> Key:
        """``NotFound`` if there is no such key."""
        ...

    def list_keys(self, product: str | None = None) -> list[Key]: ...

    def sbv2_keys(self, product: str) -> list[Key]:
        """The product's Secure Boot V2 keys in slot order (may be empty)."""
        ...

    def add_version(self, key_id: str, version: KeyVersion, make_primary: bool) -> None: ...


class ReleaseRepository(Protocol):
    def find(self, product: str, input_sha256: bytes, key_versions: Sequence[str]) -> Release | None:
        """The release made from exactly this input with exactly these key versions, if any."""
        ...

    def get(self, output_sha256: bytes) -> Release:
        """``NotFound`` if unknown."""
        ...

    def secure_version_floor(self, product: str) -> int | None:
        """Highest secure_version signed so far for the product, or None before the first release."""
        ...

    def record(self, release: Release, signed_image: bytes, signatures: Sequence[SignatureRecord]) -> Release:
        """Store the image (durably) and commit the release, its key uses and the new floor atomically.

        If the same (product, input, key versions) was recorded concurrently, returns that release and
        stores nothing. Returns only after the commit is durable.
        """
        ...

    def read_image(self, output_sha256: bytes, offset: int = 0) -> bytes:
        """The stored signed image from ``offset``; ``NotFound`` if absent, ``DataLoss`` if corrupted."""
        ...


class SignatureLog(Protocol):
    def append(self, record: SignatureRecord) -> None:
        """Record one key use; returns only once the record is durable (group commit allowed)."""
        ...
