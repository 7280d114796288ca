"""KEK rotation use cases: start a rotation, run (or resume) its rewrap, report progress, guard destruction.

The model is ``kms.domain.kek_rotation``. ``start`` rotates the product's KEK through ``KeyLifecycle`` (the
new version is generated in the HSM and made the primary, so new registrations use it at once) and records
the job. ``run`` rewraps batch by batch: read up to ``batch`` secrets under an older version, rewrap them
in the HSM in one call, store them with a compare-and-set together with the job's counter in one
transaction, and log the KEK uses. Nothing is kept in memory between batches that the database does not
hold, so a process killed at any point (SIGKILL included) resumes by calling ``run`` again on the
unfinished job: rows already moved no longer match and are not read again, a batch in flight is redone
and its compare-and-set changes nothing twice.

Both versions stay enabled meanwhile, and each device row names the version it is wrapped under, so
payloads are served throughout. ``check_destroy`` is the guard for ``KeyLifecycle``'s ``destroy_guard``:
a KEK version that still wraps a device secret may not be scheduled for destruction.

A blob that does not unwrap under its KEK version (damaged) is logged and left where it is; the job still
finishes, its ``remaining`` count stays above zero, and the guard keeps the old version from destruction.

Product scope: ``start`` and ``status_for`` (the officers' calls) refuse a product outside the caller's
scope before anything is read or rotated; ``status``, ``run`` and ``unfinished`` serve the server itself.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from kms.domain.errors import FailedPrecondition, InvalidArgument, KmsError, NotFound
from kms.domain.identity import Caller
from kms.domain.kek_rotation import KekRotation, KekRotationStatus, Rewrap
from kms.domain.keys import Key, KeyPurpose, KeyVersion, validate_product
from kms.domain.policy import require_product
from kms.domain.ports import Hsm, KekRotationRepository, KeyRepository, SignatureLog
from kms.domain.releases import SignatureRecord
from kms.service.lifecycle import KeyLifecycle, require_enabled
from kms.service.registry import primary_key_of

DEFAULT_BATCH = 500
MAX_BATCH = 1000

Progress = Callable[[KekRotationStatus], None]
"""Called after every batch with the job's counts."""

_log = logging.getLogger("kms.kek_rotation")


class KekRotationService:
    def __init__(
        self,
        hsm: Hsm,
        keys: KeyRepository,
        rotations: KekRotationRepository,
        lifecycle: KeyLifecycle,
        signature_log: SignatureLog,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._hsm = hsm
        self._keys = keys
        self._rotations = rotations
        self._lifecycle = lifecycle
        self._log = signature_log
        self._clock = clock

    # -- officers' requests ----------------------------------------------------------------------------

    def start(self, caller: Caller, product: str) -> KekRotation:
        """Rotate the product's KEK (new primary version) and record the job; ``run`` does the rewrap.

        ``FailedPrecondition`` while an earlier job of the same key is unfinished (nothing is rotated).
        """
        require_product(caller, validate_product(product))
        key, primary = primary_key_of(self._keys, product, KeyPurpose.KEY_ENCRYPTION)
        running = self._rotations.latest(key.key_id)
        if running is not None and not running.finished:
            raise FailedPrecondition(
                f"a rotation of {key.name} to version {running.to_version} is still running; "
                "wait for it to finish"
            )
        new = self._lifecycle.rotate(caller, key.key_id)
        rotation = KekRotation(
            kek_key_id=key.key_id,
            product=product,
            from_version=primary.version,
            to_version=new.version,
            started_by=caller.identity,
            started_at=self._clock(),
        )
        self._rotations.start(rotation)
        _log.info("KEK rotation of %s to version %d started by %s", key.name, new.version, caller.identity)
        return rotation

    def status(self, product: str) -> KekRotationStatus:
        """The product's latest job with live counts. ``NotFound`` if its KEK was never rotated this way."""
        key = self._kek(product)
        rotation = self._rotations.latest(key.key_id)
        if rotation is None:
            raise NotFound(f"the key-encryption key of product {product!r} has no rotation job")
        return self._status(rotation)

    def status_for(self, caller: Caller, product: str) -> KekRotationStatus:
        """``status``, if ``product`` is in ``caller``'s scope."""
        require_product(caller, validate_product(product))
        return self.status(product)

    def unfinished(self) -> list[KekRotation]:
        return self._rotations.unfinished()

    # -- the rewrap --------------------------------------------------------------------------------------

    def run(
        self,
        rotation: KekRotation,
        *,
        batch: int = DEFAULT_BATCH,
        progress: Progress | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> KekRotationStatus:
        """Rewrap every secret of the key under a version below ``to_version``; then mark the job finished.

        Resumable: call it again on the same job after any interruption. Returns early (job unfinished) when
        ``stopping()`` becomes true between batches. Raises ``FailedPrecondition`` if a version involved is
        not enabled (enable it and run again) and HSM or storage errors as they come (run again later).
        """
        if not 1 <= batch <= MAX_BATCH:
            raise InvalidArgument(f"the batch size must be 1 to {MAX_BATCH}")
        key = self._keys.get_key(rotation.kek_key_id)
        new = require_enabled(_version(key, rotation.to_version))
        stored_job = self._rotations.latest(key.key_id)
        if stored_job is not None and stored_job.to_version == rotation.to_version:
            rotation = stored_job  # the counter as committed, if the caller's copy is older
        rewrapped = rotation.rewrapped
        for number in self._rotations.versions_in_use(key.key_id):
            if number >= rotation.to_version:
                break
            old = require_enabled(_version(key, number))
            after = ""
            while True:
                if stopping():
                    return self._status(rotation, rewrapped)
                stored = self._rotations.secrets_under(key.key_id, number, batch, after)
                if not stored:
                    break
                results = self._hsm.rewrap_secrets(old.hsm_id, new.hsm_id, [s.blob for s in stored])
                rewraps: list[Rewrap] = []
                for secret, result in zip(stored, results, strict=True):
                    if isinstance(result, KmsError):
                        _log.error("device %s: %s; left under %s", secret.device_id, result, old.name)
                    else:
                        rewraps.append(Rewrap(secret, new.version, result))
                self._record_use(rotation, old, new, [r.old.device_id for r in rewraps])
                rewrapped += self._rotations.record_batch(rotation, rewraps)
                after = stored[-1].device_id
                if progress is not None:
                    progress(self._status(rotation, rewrapped))
        finished = self._rotations.finish(rotation, self._clock())
        status = self._status(finished)
        _log.info(
            "KEK rotation of keys/%s to version %d finished: %d rewrapped, %d remaining",
            key.key_id,
            rotation.to_version,
            finished.rewrapped,
            status.remaining,
        )
        return status

    # -- the destruction guard ---------------------------------------------------------------------------

    def check_destroy(self, version: KeyVersion) -> None:
        """``destroy_guard(rotations)`` of this service's repository."""
        destroy_guard(self._rotations)(version)

    # -- internals -------------------------------------------------------------------------------------

    def _kek(self, product: str) -> Key:
        validate_product(product)
        for key in self._keys.list_keys(product):
            if key.purpose is KeyPurpose.KEY_ENCRYPTION:
                return key
        raise NotFound(f"product {product!r} has no key-encryption key")

    def _status(self, rotation: KekRotation, rewrapped: int | None = None) -> KekRotationStatus:
        remaining = sum(
            self._rotations.count_under(rotation.kek_key_id, number)
            for number in self._rotations.versions_in_use(rotation.kek_key_id)
            if number < rotation.to_version
        )
        if rewrapped is not None:
            rotation = replace(rotation, rewrapped=rewrapped)
        return KekRotationStatus(rotation, remaining)

    def _record_use(self, rotation: KekRotation, old: KeyVersion, new: KeyVersion, ids: list[str]) -> None:
        """Both KEK versions were used: recorded before the rewrapped rows are stored."""
        if not ids:
            return
        digest = hashlib.sha256("\n".join(ids).encode()).digest()
        subject = f"{len(ids)} device secrets of {rotation.product}"
        now = self._clock()
        for version in (old, new):
            self._log.append(
                SignatureRecord(
                    rotation.started_by, "rewrap-device-secrets", version.name, digest, subject, now
                )
            )


def destroy_guard(rotations: KekRotationRepository) -> Callable[[KeyVersion], None]:
    """The check for ``KeyLifecycle(destroy_guard=...)``: ``FailedPrecondition`` if any device secret is
    still wrapped under the version (a KEK version); versions of other keys wrap nothing and pass."""

    def check(version: KeyVersion) -> None:
        remaining = rotations.count_under(version.key_id, version.version)
        if remaining:
            raise FailedPrecondition(
                f"{remaining} device secrets are still wrapped under {version.name}; rotate the KEK "
                "('kmsctl kek rotate') and let the rewrap finish before destroying it"
            )

    return check


def _version(key: Key, number: int) -> KeyVersion:
    try:
        return key.version(number)
    except LookupError:
        raise FailedPrecondition(f"{key.name} has no version {number}") from None
