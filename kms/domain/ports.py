"""The interfaces through which the domain and the use cases reach the outside world.

Adapters implement them: ``kms.hsm`` (PKCS#11), ``kms.store`` (SQLite and files). Unit tests use fakes.
Implementations raise only ``kms.domain.errors`` exceptions; foreign exceptions are translated where they
enter, with the cause chained, and never reach a caller's message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from kms.domain.devices import Device, Registration
from kms.domain.errors import KmsError
from kms.domain.kek_rotation import KekRotation, Rewrap, StoredSecret
from kms.domain.keys import Algorithm, Key, KeyVersion
from kms.domain.lifecycle import LifecycleChange, ManagedKey, RotationSchedule, Transition
from kms.domain.releases import Release, SignatureRecord
from kms.domain.rollover import ManifestKeyRollover


@dataclass(frozen=True)
class GeneratedKeyPair:
    """A key pair just generated inside the HSM: its handle id there, and its public half."""

    hsm_id: bytes
    public_key_der: bytes


@dataclass(frozen=True)
class TransportBatch:
    """A batch key wrapped to a registration transport key (RSA-OAEP SHA-256); secrets come KWP-wrapped."""

    transport_hsm_id: bytes
    wrapped_batch_key: bytes
    key_version: str = ""  # the transport key version's name, for the key-use record


@dataclass(frozen=True)
class ImportedSecret:
    """A device secret now wrapped under a KEK (``mechanism`` names the wrap) with its fingerprint."""

    wrapped: bytes
    mechanism: str
    fingerprint: bytes


class Hsm(Protocol):
    """Private- and secret-key operations: private keys, KEKs and device secrets never leave in plaintext."""

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

    def generate_secret_key(self, algorithm: Algorithm, label: str) -> bytes:
        """Generate a sensitive, non-extractable AES-256 KEK (wrap/unwrap) or HMAC-SHA256 key; its hsm_id."""
        ...

    def import_secrets(
        self,
        kek_hsm_id: bytes,
        secrets: Sequence[bytes],
        *,
        transport: TransportBatch | None,
        fingerprint_message: bytes,
    ) -> list[ImportedSecret | KmsError]:
        """Wrap device secrets under the KEK; one result per secret, in order.

        With ``transport`` each secret is RFC 3394-wrapped under the batch key, which the HSM unwraps with the
        transport private key; each secret is then unwrapped straight into a session object, so its plaintext
        never exists outside the HSM. Without ``transport`` each secret is the plaintext (32 bytes). The
        fingerprint is HMAC-SHA256 keyed by the secret over ``fingerprint_message``. A malformed secret gives
        an ``InvalidArgument`` in its slot; HSM failures raise.
        """
        ...

    def hmac_with_wrapped_secret(self, kek_hsm_id: bytes, wrapped: bytes, message: bytes) -> bytes:
        """HMAC-SHA256 keyed by a KEK-wrapped secret, unwrapped only inside the HSM into a session object."""
        ...

    def rewrap_secrets(
        self, old_kek_hsm_id: bytes, new_kek_hsm_id: bytes, blobs: Sequence[bytes]
    ) -> list[bytes | KmsError]:
        """Each KEK-wrapped secret unwrapped under the old KEK and wrapped under the new one, inside the HSM
        (the secret exists only as a session object there). One result per blob, in order: the new blob, or
        a ``KmsError`` for a blob that does not unwrap; HSM outages raise."""
        ...

    def hmac(self, hsm_id: bytes, message: bytes) -> bytes:
        """HMAC-SHA256 with an HSM-held HMAC key."""
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

    # -- lifecycle (kms.domain.lifecycle) ----------------------------------------------------------------

    def get_managed_key(self, key_id: str) -> ManagedKey:
        """The key with its destruction due times and rotation schedule, in one snapshot. ``NotFound``."""
        ...

    def apply_change(self, change: LifecycleChange) -> None:
        """Write a lifecycle change and its transition records in one transaction.

        Refused with ``FailedPrecondition``, writing nothing, unless the key's versions, their states and
        its primary are still those the change was ``based_on``. ``NotFound`` if the key is gone.
        """
        ...

    def record_material_destroyed(self, key_id: str, version: int, at: datetime) -> None:
        """Note that a DESTROYED version's HSM material is confirmed gone (``FailedPrecondition`` if the
        version is not DESTROYED)."""
        ...

    def due_for_destruction(self, now: datetime) -> list[KeyVersion]:
        """Versions to destroy now: DESTROY_SCHEDULED and due, or DESTROYED with material not yet confirmed
        gone (an earlier attempt failed half-way). Oldest due first."""
        ...

    def due_for_rotation(self, now: datetime) -> list[str]:
        """Ids of the keys whose next scheduled rotation is at or before ``now``, earliest first."""
        ...

    def set_rotation_schedule(self, key_id: str, schedule: RotationSchedule | None) -> None:
        """Set (or with None remove) the key's rotation schedule. ``NotFound`` if there is no such key."""
        ...

    def record_transition(self, transition: Transition) -> None:
        """Append one transition record (e.g. a key's creation). ``NotFound`` if the version is unknown."""
        ...

    def list_transitions(self, key_id: str, version: int | None = None) -> list[Transition]:
        """The key's (or one version's) transition records, oldest first. ``NotFound`` if no such key."""
        ...


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


class RolloverRepository(Protocol):
    """OTA manifest key rollover statements (``kms.domain.rollover``); they are written by
    ``KeyRepository.apply_change`` with the version they introduce."""

    def list_rollovers(self, key_id: str) -> list[ManifestKeyRollover]:
        """Every statement of the key, by ``to_version`` (empty for an unknown key)."""
        ...


class DeviceRepository(Protocol):
    def get(self, device_id: str) -> Device:
        """``NotFound`` if the device is not registered."""
        ...

    def add_many(self, devices: Sequence[Device]) -> list[Registration | KmsError]:
        """Register a batch in one transaction; per device a ``Registration`` or a ``KmsError``."""
        ...

    def revoke(self, device_id: str, at: datetime) -> Device: ...

    def count(self, product: str | None = None) -> int: ...

    def payload_signature(
        self, device_id: str, release: bytes, segment_size: int, key_version: str
    ) -> bytes | None: ...

    def save_payload_signature(
        self,
        device_id: str,
        release: bytes,
        segment_size: int,
        key_version: str,
        signature: bytes,
        at: datetime,
    ) -> bytes:
        """Store unless present; return the stored signature (the first writer wins)."""
        ...


class KekRotationRepository(Protocol):
    """KEK rotation jobs and the device secrets they move (``kms.domain.kek_rotation``)."""

    def secrets_under(
        self, kek_key_id: str, kek_version: int, limit: int, after_device_id: str = ""
    ) -> list[StoredSecret]:
        """Up to ``limit`` secrets wrapped under this KEK version, by device id, after ``after_device_id``."""
        ...

    def count_under(self, kek_key_id: str, kek_version: int) -> int:
        """How many device secrets are wrapped under this KEK version."""
        ...

    def versions_in_use(self, kek_key_id: str) -> list[int]:
        """The versions of this KEK that wrap at least one device secret, ascending."""
        ...

    def start(self, rotation: KekRotation) -> None:
        """Record a new job. ``FailedPrecondition`` if the key has an unfinished job already."""
        ...

    def record_batch(self, rotation: KekRotation, rewraps: Sequence[Rewrap]) -> int:
        """In one transaction: store each rewrapped secret if its row still holds the secret read
        (compare-and-set) and add the rows changed to the job's count; return that number."""
        ...

    def finish(self, rotation: KekRotation, at: datetime) -> KekRotation:
        """Mark the job finished (idempotent); return it as stored."""
        ...

    def latest(self, kek_key_id: str) -> KekRotation | None:
        """The key's most recent job (highest ``to_version``), if any."""
        ...

    def unfinished(self) -> list[KekRotation]:
        """Every job not finished yet, oldest first."""
        ...


class ImageSource(Protocol):
    def image_view(self, output_sha256: bytes) -> memoryview:
        """A read-only view of a stored signed image, verified against its SHA-256 (``NotFound``)."""
        ...
