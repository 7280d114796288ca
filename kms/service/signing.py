"""Signing use cases for build servers: sign an ESP app image, sign a digest, read public keys.

Sign an image, step by step (each step may refuse, and nothing is written before the last):

1. Parse and validate the image (``kms.domain.esp_image``): a malformed image is an ``InvalidImage``.
2. Take the product's Secure Boot V2 keys of ACTIVE slots in slot order (a revoked slot's key signs nothing
   any more: ``kms.domain.sbv2_slots``), their primary versions, and check them against the chip named in
   the image header (algorithm, number of key digests the chip holds, chip revision, width of the
   anti-rollback eFuse).
3. If this exact input was signed for the product by exactly these key versions, return that release
   (CI retries are idempotent, and no key is used again). A release made before a slot was revoked names
   that slot's key version too, so it is never returned afterwards: the image is signed anew without it.
4. Refuse a secure_version below the product's anti-rollback floor.
5. Pad, hash and sign once per key in the HSM; check every block (canonical bytes, valid signature) before
   assembling the signature sector.
6. Store the signed image and commit the release with one key-use record per signature; only then answer.

Every signature the HSM made is recorded
-----------------------------------------
The key-use records of a release are committed with it. When the release is not committed although the HSM
has signed (the store refuses it at commit: a slot revoked or the floor raised meanwhile; a later key's
signature failed; a concurrent identical request's release was stored instead), the signatures made are
appended to the ``SignatureLog`` before the error (or the other release) is returned, with a subject saying
that nothing was released. The signed bytes never leave the service in that case, but the key uses happened.
A digest signature that fails its check is recorded the same way before the error (``sign_digest``), and so
are the manifest signature and the key derivation of a payload whose later steps fail
(``kms.service.distribution``).

What a slot revocation binds, exactly
-------------------------------------
- Releases: exactly, in the commit transaction. The store refuses a release carrying a block by a revoked
  slot's key (``kms.domain.sbv2_slots.check_release_keys``) whatever this process had read, so no release
  committed after the revocation carries the revoked slot's block.
- ``SignDigest``: revoked slots are read through ``RevokedSlotCache``, like keys through ``KeyCache``. In
  the process that executed the revocation (its use case calls ``slots_changed``), every call that starts
  after ``ExecuteRequest`` returned is refused; in other processes, every call that starts more than ``ttl``
  (1 s) after the revocation committed. A call already past the check when the revocation commits may
  still finish (its signature is recorded like any other).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Generic, TypeVar

from kms.domain import chips, esp_image, sbv2, sbv2_slots, signatures
from kms.domain.errors import FailedPrecondition, HsmFailure, InvalidArgument, KmsError, NotFound
from kms.domain.identity import Caller
from kms.domain.keys import (
    HashAlgorithm,
    Key,
    KeyName,
    KeyPurpose,
    KeyVersion,
    KeyVersionState,
    validate_product,
)
from kms.domain.policy import in_scope, require_product
from kms.domain.ports import Hsm, KeyRepository, ReleaseRepository, SignatureLog
from kms.domain.releases import Release, SignatureRecord, check_floor
from kms.domain.sbv2_slots import SlotRevocationRepository
from kms.domain.signatures import SignatureEncoding

if TYPE_CHECKING:
    from hashlib import _Hash as HashObject

_logger = logging.getLogger("kms.signing")
_K = TypeVar("_K")
_V = TypeVar("_V")

DIGEST_PURPOSES = frozenset({KeyPurpose.SECURE_BOOT_V2, KeyPurpose.DIGEST_SIGNING})
"""Purposes whose keys sign caller-supplied digests. OTA manifest keys sign only manifests the service
builds itself, or a build server could forge a payload manifest for any device."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SignedImage:
    """A release; ``data`` holds the signed image when it was just made (else read it from the store)."""

    release: Release
    reused: bool
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DigestSignature:
    key_version: KeyVersion
    signature: bytes
    encoding: SignatureEncoding


def _enabled(key: Key, number: int | None = None) -> KeyVersion:
    try:
        version = key.version(number)
    except LookupError:
        raise NotFound(f"key {key.name} has no version {number}") from None
    if version.state is not KeyVersionState.ENABLED:
        raise FailedPrecondition(
            f"key version {version.name} is {version.state.value}; only enabled versions sign"
        )
    return version


class _ExpiringCache(Generic[_K, _V]):
    """Values of ``load(key)`` kept for ``ttl`` seconds, with an ``invalidate`` that really binds.

    A refill reads outside the lock (a slow read of one entry must not hold up the others), so an
    ``invalidate`` may run while a refill that started before it is still reading, and that refill may have
    read the state from before the change that prompted the ``invalidate``. Storing its result would serve
    the old state for another ``ttl`` seconds after the ``invalidate`` returned. Hence a generation counter:
    ``invalidate`` increments it, and a refill stores its result only if the generation is still the one it
    saw when it started. The refill still returns what it read to its own caller, whose call began before
    the ``invalidate``; every read that starts after ``invalidate`` returned loads afresh.
    """

    def __init__(self, load: Callable[[_K], _V], ttl: float) -> None:
        self._load = load
        self._ttl = ttl
        self._lock = threading.Lock()
        self._entries: dict[_K, tuple[float, _V]] = {}
        self._generation = 0

    def get(self, key: _K) -> _V:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > now:
                return entry[1]
            generation = self._generation
        value = self._load(key)
        with self._lock:
            if self._generation == generation:
                self._entries[key] = (now + self._ttl, value)
        return value

    def invalidate(self, key: _K) -> None:
        with self._lock:
            self._generation += 1
            self._entries.pop(key, None)


class KeyCache:
    """Keys by id for ``ttl`` seconds, so the signing hot path does not read SQLite on every call.

    A change made by another process (a new version, a state change) is seen after at most ``ttl``
    seconds (1 s by default), as with the eventual consistency of Cloud KMS key state changes. A change made
    by this process is seen by every call that starts after ``invalidate`` returned (``_ExpiringCache``).
    """

    def __init__(self, keys: KeyRepository, ttl: float = 1.0) -> None:
        self._cache: _ExpiringCache[str, Key] = _ExpiringCache(keys.get_key, ttl)

    def get(self, key_id: str) -> Key:
        return self._cache.get(key_id)

    def invalidate(self, key_id: str) -> None:
        """Forget a key at once (this process changed it: see ``KeyLifecycle(changed=...)``)."""
        self._cache.invalidate(key_id)


def _no_revoked_slots(product: str) -> frozenset[int]:
    return frozenset()


class RevokedSlotCache:
    """Revoked Secure Boot V2 slot numbers by product for ``ttl`` seconds, as ``KeyCache`` keeps keys.

    A revocation committed by another process is seen within ``ttl`` seconds; one this process committed
    (and then called ``invalidate``) by every call that starts after ``invalidate`` returned, even while a
    refill that began before it is still reading (``_ExpiringCache``). Without a repository no slot is ever
    revoked (a service built without slot revocations).
    """

    def __init__(self, revocations: SlotRevocationRepository | None, ttl: float = 1.0) -> None:
        load = _no_revoked_slots if revocations is None else revocations.revoked_slots
        self._cache: _ExpiringCache[str, frozenset[int]] = _ExpiringCache(load, ttl)

    def get(self, product: str) -> frozenset[int]:
        return self._cache.get(product)

    def invalidate(self, product: str) -> None:
        """Forget a product's slots at once (this process revoked one: ``SigningService.slots_changed``)."""
        self._cache.invalidate(product)


class SigningService:
    def __init__(
        self,
        hsm: Hsm,
        keys: KeyRepository,
        releases: ReleaseRepository,
        signature_log: SignatureLog,
        *,
        max_image_size: int,
        cpu_slots: int = 2,
        clock: Callable[[], datetime] = _utcnow,
        slot_revocations: SlotRevocationRepository | None = None,
    ) -> None:
        self._hsm = hsm
        self._keys = keys
        self._key_cache = KeyCache(keys)
        self._revoked_slots = RevokedSlotCache(slot_revocations)
        self._releases = releases
        self._log = signature_log
        self.max_image_size = max_image_size
        # Digest signing is CPU work under the GIL (HSM call, verification): letting every RPC thread run it
        # at once only adds contention. The durable key-use record is written outside this section, so
        # waiting for its commit does not hold a slot and records still batch.
        self._cpu_slots = threading.BoundedSemaphore(cpu_slots)
        self._clock = clock

    def sign_image(
        self, caller: Caller, product: str, image: bytes, image_hash: HashObject | None = None
    ) -> SignedImage:
        """Sign ``image``; ``image_hash`` is a SHA-256 object fed exactly ``image`` (saves a pass over it)."""
        validate_product(product)
        require_product(caller, product)
        app = esp_image.parse_app_image(image, self.max_image_size)
        all_keys = self._keys.sbv2_keys(product)
        if not all_keys:
            raise NotFound(
                f"product {product!r} has no Secure Boot V2 keys; a security officer creates one with "
                f"'kms keys create --product {product} --purpose secure-boot-v2 ...'"
            )
        keys = sbv2_slots.signing_keys(all_keys, self._revoked_slots.get(product))
        if not keys:
            raise FailedPrecondition(f"every Secure Boot V2 slot of product {product!r} is revoked")
        versions = [_enabled(key) for key in keys]
        chips.check_sbv2_keys(app.chip, [v.algorithm for v in versions], [v.name for v in versions])
        chips.check_sbv2_chip_revision(app.chip, app.min_chip_rev_full)
        chips.check_secure_version(app.chip, app.secure_version)
        version_names = tuple(v.name for v in versions)
        hashed = image_hash.copy() if image_hash is not None else hashlib.sha256(image)
        input_sha256 = hashed.digest()

        existing = self._releases.find(product, input_sha256, version_names)
        if existing is not None:
            return SignedImage(existing, reused=True)

        check_floor(product, app.secure_version, self._releases.secure_version_floor(product))

        padded = sbv2.pad_image(image)
        hashed.update(memoryview(padded)[len(image) :])  # SHA-256 of the padded image, one pass in all
        now = self._clock()
        made: list[SignatureRecord] = []  # every signature the HSM made, whatever happens next
        unreleased = f"image {input_sha256.hex()} of product {product} (not released)"
        try:
            blocks: list[bytes] = []
            for version in versions:
                if version.algorithm.hash is HashAlgorithm.SHA256:
                    digest = hashed.digest()
                else:
                    digest = sbv2.image_digest(padded, version.algorithm)
                raw = self._hsm.sign_digest(version.hsm_id, version.algorithm, digest)
                made.append(SignatureRecord(caller.identity, "sign-image", version.name, digest, "", now))
                block = sbv2.signature_block(version.algorithm, version.public_key_der, digest, raw)
                if not sbv2.verify_block(block, digest, version.public_key_der):
                    raise HsmFailure(f"the signature by {version.name} does not verify; nothing was released")
                blocks.append(block)
            sector = sbv2.signature_sector(blocks)
            signed = padded + sector
            hashed.update(sector)

            release = Release(
                product=product,
                chip=app.chip.name,
                version=app.version,
                secure_version=app.secure_version,
                project_name=app.project_name,
                input_sha256=input_sha256,
                output_sha256=hashed.digest(),
                output_size=len(signed),
                key_versions=version_names,
                signed_by=caller.identity,
                created_at=now,
            )
            unreleased = f"{release.name} (not released)"
            records = [replace(record, subject=release.name) for record in made]
            stored = self._releases.record(release, signed, records)
        except Exception as refused:
            self._record_unreleased(made, unreleased, refused)
            raise
        if stored.output_sha256 != release.output_sha256:  # a concurrent identical request won the race
            self._record_unreleased(made, f"{release.name} (not released: {stored.name} was)", None)
            return SignedImage(stored, reused=True)
        return SignedImage(stored, reused=False, data=signed)

    def _record_unreleased(
        self, made: Sequence[SignatureRecord], subject: str, refused: Exception | None
    ) -> None:
        """Append to the ``SignatureLog`` the key uses of signatures the HSM made for a release that was not
        committed (so their records were not stored with it), with ``subject``. A failure to append is
        logged, and does not replace ``refused``, the error the caller gets."""
        for record in made:
            try:
                self._log.append(replace(record, subject=subject))
            except KmsError as error:
                _logger.error(
                    "could not record the key use of %s for %s after %s: %s",
                    record.key_version,
                    subject,
                    "a concurrent release" if refused is None else type(refused).__name__,
                    error,
                )

    def key_changed(self, key_id: str) -> None:
        """Drop cached state of a key this process just changed (wire to ``KeyLifecycle(changed=...)``)."""
        self._key_cache.invalidate(key_id)

    def slots_changed(self, product: str) -> None:
        """Drop the cached revoked slots of a product whose slot this process just revoked."""
        self._revoked_slots.invalidate(product)

    def read_release(self, release: Release, offset: int = 0) -> bytes:
        return self._releases.read_image(release.output_sha256, offset)

    def sign_digest(
        self,
        caller: Caller,
        name: str,
        digest: bytes,
        hash_algorithm: HashAlgorithm,
        encoding: SignatureEncoding,
    ) -> DigestSignature:
        key_name = KeyName.parse(name)
        key = self._key_cache.get(key_name.key_id)
        require_product(caller, key.product)
        if key.purpose not in DIGEST_PURPOSES:
            raise FailedPrecondition(
                f"key {key.name} is a {key.purpose.value} key; only secure-boot-v2 and digest-signing keys "
                "sign caller-supplied digests"
            )
        if key.purpose is KeyPurpose.SECURE_BOOT_V2:
            sbv2_slots.check_not_revoked(key, self._revoked_slots.get(key.product))
        version = _enabled(key, key_name.version)
        algorithm = version.algorithm
        if hash_algorithm is not algorithm.hash or len(digest) != algorithm.hash.size:
            raise InvalidArgument(
                f"key {version.name} ({algorithm.value}) signs {algorithm.hash.value} digests of "
                f"{algorithm.hash.size} bytes; got a {hash_algorithm.value} digest of {len(digest)} bytes"
            )
        if encoding is SignatureEncoding.DER and not algorithm.is_ecdsa:
            raise InvalidArgument(
                f"DER encoding exists for ECDSA signatures only; {version.name} is {algorithm.value}"
            )
        with self._cpu_slots:
            raw = self._hsm.sign_digest(version.hsm_id, algorithm, digest)
            try:
                signatures.check_signature(algorithm, version.public_key_der, digest, raw)
            except Exception:  # the HSM signed, so the key was used: record it, though nothing is returned
                subject = f"{digest.hex()} (not returned: the signature failed its check)"
                self._log.append(
                    SignatureRecord(
                        caller.identity, "sign-digest", version.name, digest, subject, self._clock()
                    )
                )
                raise
        self._log.append(
            SignatureRecord(caller.identity, "sign-digest", version.name, digest, digest.hex(), self._clock())
        )
        return DigestSignature(version, signatures.encode(algorithm, raw, encoding), encoding)

    def public_key(self, name: str) -> tuple[Key, KeyVersion]:
        key_name = KeyName.parse(name)
        key = self._keys.get_key(key_name.key_id)
        if not key.version().public_key_der:
            raise FailedPrecondition(
                f"{key.name} is a {key.algorithm.value} secret key; it has no public part"
            )
        try:
            return key, key.version(key_name.version)
        except LookupError:
            raise NotFound(f"key {key.name} has no version {key_name.version}") from None

    def list_keys(self, product: str | None, caller: Caller) -> Sequence[Key]:
        """The keys of ``product`` (or of every product) within the caller's product scope."""
        if product:
            validate_product(product)
        return [k for k in self._keys.list_keys(product or None) if in_scope(caller, k.product)]
