"""Key lifecycle use cases: rotate, enable and disable versions, schedule and cancel destruction, destroy.

The rules are ``kms.domain.lifecycle``'s; this module reads a key, asks the rules, creates or destroys HSM
material and has the store apply the resulting change, with a transition record (who, when, from, to) for
every event. The store applies a change only if the key did not change meanwhile (``FailedPrecondition``
otherwise: read again and retry).

HSM material
------------
- Rotation generates the new version's material first (``Hsm.generate_key_pair``, or
  ``Hsm.generate_secret_key`` for AES and HMAC keys, as ``KeyAdministration`` does) and destroys it again if
  the change cannot be stored, so a failed rotation leaves nothing behind.
- Destruction first records the version as DESTROYED (so that no concurrent "cancel" can bring back a
  version whose material is going), then destroys the material (``Hsm.destroy_key_pair``, idempotent), then
  records the material as gone. If the HSM fails in between, the version stays DESTROYED with its material
  not confirmed gone, and the next ``destroy_due`` destroys it again.

Rollover statements
-------------------
Rotating an OTA manifest key (on demand or on schedule) also makes the new version's rollover statement
(``kms.domain.rollover``): its public key signed in the HSM by the primary version before the rotation, so
devices that trust the old key can move to the new one without a reflash. The signer must pass
``require_enabled``; if the primary is not enabled (an officer disabled the key), the rotation goes ahead
without a statement and the chain has a gap, which is logged (devices trusting older keys then need a
reflash; ``kms.domain.rollover.rollover_chain`` names the gap). The statement, the new version and the
key-use record of the signature are committed in one transaction (``apply_change``): a crash before the
commit leaves none of them (only generated HSM material, as any failed rotation), after it all three. If
the change is refused (the key changed meanwhile), the statement is discarded with the new material, whose
private key is destroyed, so the statement introduces a key that no longer exists and never left the
service. The signature was a use of the signing version all the same: its key-use record is appended to
the ``SignatureLog`` (its subject saying the version was not created) before the refusal is returned, as it
is when the signature made fails its check. A failure to sign (HSM unavailable) fails the rotation rather
than leave a gap; the scheduler tries again on its next run.

An OTA manifest key's primary moves forward only: ``kms.domain.lifecycle`` refuses every request that would
make an older version primary, so each version signs at most one stored statement and the statements of a
key form one chain, which no replay can leave (``docs/manifest-key-rollover.md``).

Scheduled work
--------------
``destroy_due(now)`` and ``rotate_due(now)`` are meant to be called periodically (every minute, say) by the
server; both are safe to run concurrently with each other and with officers' requests, and in several
processes. The actor they record is ``SCHEDULER``.

Guard
-----
``require_enabled(version)`` is the one check that a version may be used for new signatures, wraps or
unwraps; every use case that hands a version's ``hsm_id`` to the HSM calls it first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from kms.domain import lifecycle, rollover, signatures
from kms.domain.errors import FailedPrecondition, InvalidArgument, KmsError
from kms.domain.identity import Caller
from kms.domain.keys import Key, KeyName, KeyPurpose, KeyVersion, KeyVersionState
from kms.domain.lifecycle import LifecycleChange, ManagedKey, Transition
from kms.domain.policy import require_product
from kms.domain.ports import Hsm, KeyRepository, SignatureLog
from kms.domain.releases import SignatureRecord
from kms.service.keys import SECRET_KEY_ALGORITHMS

SCHEDULER = "kms:scheduler"
"""The actor recorded for scheduled rotations and destructions."""

_DESTROYING = frozenset({KeyVersionState.DESTROY_SCHEDULED, KeyVersionState.DESTROYED})
_log = logging.getLogger("kms.lifecycle")


def require_enabled(version: KeyVersion) -> KeyVersion:
    """``version`` if it is enabled; otherwise ``FailedPrecondition``: only enabled versions sign, wrap or
    unwrap. Call it before every HSM operation with a version's ``hsm_id``."""
    if version.state is not KeyVersionState.ENABLED:
        raise FailedPrecondition(
            f"key version {version.name} is {version.state.value}; only enabled versions sign, wrap or unwrap"
        )
    return version


@dataclass(frozen=True)
class SweepResult:
    """What one run of scheduled work did: key version names done, and those that failed, with why."""

    done: tuple[str, ...] = ()
    failed: tuple[tuple[str, KmsError], ...] = ()


def _version_name(name: str) -> tuple[str, int]:
    """(key id, version number) of ``keys/KEY_ID/versions/N``."""
    parsed = KeyName.parse(name)
    if parsed.version is None:
        raise InvalidArgument(f"{name!r} names a key; a key version is needed: 'keys/KEY_ID/versions/N'")
    return parsed.key_id, parsed.version


class KeyLifecycle:
    """Lifecycle operations on keys. ``destroy_delay`` is the default delay before a scheduled destruction."""

    def __init__(
        self,
        hsm: Hsm,
        keys: KeyRepository,
        *,
        destroy_delay: timedelta = lifecycle.DEFAULT_DESTROY_DELAY,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        changed: Callable[[str], None] = lambda key_id: None,
        destroy_guard: Callable[[KeyVersion], None] | None = None,
        signature_log: SignatureLog | None = None,
    ) -> None:
        """``changed(key_id)`` is called after every change this service stores (drop cached keys there).
        ``destroy_guard(version)`` is asked before a destruction is scheduled and refuses by raising (a KEK
        version that still wraps device secrets: ``kms.service.kek_rotation``). ``signature_log`` records
        the key use of a rollover statement whose rotation was refused at commit (the server passes its
        log; without one, such a use is only logged as an error)."""
        self._signature_log = signature_log
        self._hsm = hsm
        self._keys = keys
        self._destroy_delay = lifecycle.check_destroy_delay(destroy_delay)
        self._clock = clock
        self._changed = changed
        self._destroy_guard = destroy_guard

    # -- reading ---------------------------------------------------------------------------------------

    def get(self, key_id: str) -> ManagedKey:
        return self._keys.get_managed_key(KeyName.parse(f"keys/{key_id}").key_id)

    def transitions(self, name: str) -> list[Transition]:
        """The transition records of a key (``keys/K``) or of one version (``keys/K/versions/N``)."""
        parsed = KeyName.parse(name)
        return self._keys.list_transitions(parsed.key_id, parsed.version)

    def transitions_for(self, caller: Caller, name: str) -> list[Transition]:
        """``transitions``, if the key's product is in ``caller``'s scope."""
        self._scoped(caller, KeyName.parse(name).key_id)
        return self.transitions(name)

    def _scoped(self, caller: Caller, key_id: str) -> ManagedKey:
        """The key, if its product is in ``caller``'s scope (``PermissionDenied`` otherwise). Every
        officer's request below calls it first, before anything is generated or written."""
        managed = self.get(key_id)
        require_product(caller, managed.key.product)
        return managed

    def get_for(self, caller: Caller, name: str) -> ManagedKey:
        """The key named ``keys/K`` or ``keys/K/versions/N``, if its product is in ``caller``'s scope."""
        return self._scoped(caller, KeyName.parse(name).key_id)

    def record_creation(self, caller: Caller, key: Key) -> None:
        """Record the creation of a key just stored by ``KeyAdministration.create_key``."""
        self._keys.apply_change(lifecycle.creation(key, caller.identity))

    # -- officers' requests ----------------------------------------------------------------------------

    def rotate(self, caller: Caller, key_id: str) -> KeyVersion:
        """Generate version n+1 in the HSM and make it the primary; return it."""
        managed = self._scoped(caller, key_id)
        return self._rotate(managed, caller.identity, self._clock())

    def set_state(
        self, caller: Caller, name: str, target: KeyVersionState, *, new_primary: int | None = None
    ) -> ManagedKey:
        """Move a version (``keys/K/versions/N``) to ``target`` (see ``kms.domain.lifecycle.TRANSITIONS``).

        DESTROY_SCHEDULED uses the service's destruction delay; DISABLED from DESTROY_SCHEDULED cancels the
        destruction; DESTROYED is allowed once the destruction is due and destroys the HSM material at once.
        """
        key_id, number = _version_name(name)
        self._scoped(caller, key_id)
        if target is KeyVersionState.DESTROYED:
            self._destroy(self.get(key_id), number, caller.identity, self._clock())
            return self.get(key_id)
        return self._change(
            key_id,
            lambda managed, now: lifecycle.transition(
                managed,
                number,
                target,
                caller.identity,
                now,
                destroy_delay=self._destroy_delay,
                new_primary=new_primary,
            ),
        )

    def set_primary(self, caller: Caller, name: str) -> ManagedKey:
        key_id, number = _version_name(name)
        self._scoped(caller, key_id)
        return self._change(
            key_id,
            lambda managed, now: lifecycle.set_primary(managed, number, caller.identity, now),
        )

    def schedule_destroy(
        self,
        caller: Caller,
        name: str,
        *,
        delay: timedelta | None = None,
        new_primary: int | None = None,
    ) -> ManagedKey:
        """Schedule a version's destruction after ``delay`` (default: the service's destruction delay)."""
        key_id, number = _version_name(name)
        self._scoped(caller, key_id)
        if self._destroy_guard is not None:
            self._destroy_guard(self.get(key_id).version(number))
        return self._change(
            key_id,
            lambda managed, now: lifecycle.schedule_destroy(
                managed,
                number,
                caller.identity,
                now,
                delay=self._destroy_delay if delay is None else delay,
                new_primary=new_primary,
            ),
        )

    def cancel_destroy(self, caller: Caller, name: str) -> ManagedKey:
        """Cancel a scheduled destruction; the version becomes disabled."""
        key_id, number = _version_name(name)
        self._scoped(caller, key_id)
        return self._change(
            key_id,
            lambda managed, now: lifecycle.cancel_destroy(managed, number, caller.identity, now),
        )

    def set_rotation_schedule(
        self,
        caller: Caller,
        key_id: str,
        period: timedelta | None,
        first_rotation: datetime | None = None,
    ) -> ManagedKey:
        """Rotate the key every ``period`` from ``first_rotation`` (default now + period); None: on demand."""
        managed = self._scoped(caller, key_id)  # the caller is recorded by the audit log, not here
        schedule = None
        if period is not None:
            schedule = lifecycle.rotation_schedule(managed.key, period, self._clock(), first_rotation)
        self._keys.set_rotation_schedule(managed.key.key_id, schedule)
        return self.get(key_id)

    # -- scheduled work --------------------------------------------------------------------------------

    def destroy_due(self, now: datetime | None = None, *, actor: str = SCHEDULER) -> SweepResult:
        """Destroy every version whose scheduled destruction is due at ``now`` (default: the clock)."""
        now = self._clock() if now is None else now
        done: list[str] = []
        failed: list[tuple[str, KmsError]] = []
        for due in self._keys.due_for_destruction(now):
            try:
                managed = self._keys.get_managed_key(due.key_id)
                if managed.version(due.version).state not in _DESTROYING:
                    continue  # the destruction was cancelled meanwhile
                self._destroy(managed, due.version, actor, now)
            except KmsError as e:
                _log.warning("could not destroy %s: %s", due.name, e)
                failed.append((due.name, e))
            else:
                done.append(due.name)
        return SweepResult(tuple(done), tuple(failed))

    def rotate_due(self, now: datetime | None = None, *, actor: str = SCHEDULER) -> SweepResult:
        """Rotate every key whose scheduled rotation is due at ``now`` (default: the clock).

        Keys without an enabled version are skipped (``kms.domain.lifecycle.scheduled_rotation_is_due``).
        """
        now = self._clock() if now is None else now
        done: list[str] = []
        failed: list[tuple[str, KmsError]] = []
        for key_id in self._keys.due_for_rotation(now):
            try:
                managed = self._keys.get_managed_key(key_id)
                if lifecycle.scheduled_rotation_is_due(managed, now):
                    done.append(self._rotate(managed, actor, now).name)
            except KmsError as e:
                _log.warning("could not rotate keys/%s: %s", key_id, e)
                failed.append((str(KeyName(key_id)), e))
        return SweepResult(tuple(done), tuple(failed))

    # -- internals -------------------------------------------------------------------------------------

    def _change(self, key_id: str, plan: Callable[[ManagedKey, datetime], LifecycleChange]) -> ManagedKey:
        change = plan(self.get(key_id), self._clock())
        if not change.is_empty:
            self._keys.apply_change(change)
            self._changed(key_id)
        return self.get(key_id)

    def _rotate(self, managed: ManagedKey, actor: str, now: datetime) -> KeyVersion:
        key = managed.key
        label = f"{key.key_id}/{lifecycle.next_version_number(key)}"
        if key.algorithm in SECRET_KEY_ALGORITHMS:
            hsm_id, public_der = self._hsm.generate_secret_key(key.algorithm, label), b""
        else:
            pair = self._hsm.generate_key_pair(key.algorithm, label)
            hsm_id, public_der = pair.hsm_id, pair.public_key_der
        signed: list[SignatureRecord] = []  # the HSM signatures made for this rotation, stored or not
        try:
            change = lifecycle.rotate(managed, hsm_id, public_der, actor, now)
            if key.purpose is KeyPurpose.OTA_MANIFEST:
                change = self._with_rollover(managed, change, actor, now, signed)
            self._keys.apply_change(change)
        except BaseException as failure:
            try:
                if isinstance(failure, Exception):
                    self._record_unstored(signed, failure)
            finally:
                self._hsm.destroy_key_pair(hsm_id)
            raise
        self._changed(key.key_id)
        assert change.new_version is not None
        return change.new_version

    def _with_rollover(
        self,
        managed: ManagedKey,
        change: LifecycleChange,
        actor: str,
        now: datetime,
        signed: list[SignatureRecord],
    ) -> LifecycleChange:
        """``change`` (a rotation) with the new version's rollover statement, signed in the HSM by the
        primary before the rotation, and the key-use record of that signature, also appended to ``signed``
        as soon as the HSM has signed; ``change`` unchanged, and a warning, if that primary is not enabled
        (a gap in the chain: see the module docstring)."""
        key, new = managed.key, change.new_version
        assert new is not None
        try:
            signer = require_enabled(managed.version(key.primary_version))
        except FailedPrecondition as refused:
            _log.warning(
                "no rollover statement for %s: %s; devices that trust an earlier manifest key of product "
                "%r cannot move to it by rollover (they need a reflash)",
                new.name,
                refused,
                key.product,
            )
            return change
        body = rollover.statement_body(key, signer.version, new.version, new.public_key_der)
        digest = body.digest()
        raw = self._hsm.sign_digest(signer.hsm_id, signer.algorithm, digest)
        use = SignatureRecord(actor, "sign-key-rollover", signer.name, digest, new.name, now)
        signed.append(use)
        signatures.check_signature(signer.algorithm, signer.public_key_der, digest, raw)
        statement = rollover.RolloverStatement(body, raw).to_bytes()
        record = rollover.ManifestKeyRollover(key.key_id, signer.version, new.version, statement, now)
        return replace(change, rollover=record, key_uses=(*change.key_uses, use))

    def _record_unstored(self, signed: list[SignatureRecord], failure: Exception) -> None:
        """Append the key uses in ``signed`` (their rotation failed, so the change that carried them was not
        stored) to the signature log. Their subject names the version the rotation would have made, which a
        later rotation may make with another key: it says that this one was not created. A failure to
        append is logged and does not replace ``failure``, the error the caller gets."""
        for use in signed:
            unstored = replace(use, subject=f"{use.subject} (not created: {type(failure).__name__})")
            try:
                if self._signature_log is None:
                    raise FailedPrecondition("this KeyLifecycle has no signature log")
                self._signature_log.append(unstored)
            except KmsError as error:
                _log.error(
                    "could not record the key use of %s (%s, %s): %s",
                    use.key_version,
                    use.operation,
                    unstored.subject,
                    error,
                )

    def _destroy(self, managed: ManagedKey, number: int, actor: str, now: datetime) -> None:
        """Record the version DESTROYED (the rules refuse unless it is due), then destroy its material and
        record that; for a version already DESTROYED, only the last two (finishing an interrupted run)."""
        version = managed.version(number)
        if version.state is not KeyVersionState.DESTROYED:
            change = lifecycle.transition(managed, number, KeyVersionState.DESTROYED, actor, now)
            self._keys.apply_change(change)
            self._changed(version.key_id)
        self._hsm.destroy_key_pair(version.hsm_id)
        self._keys.record_material_destroyed(version.key_id, number, now)
