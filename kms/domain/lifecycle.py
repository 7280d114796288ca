"""The lifecycle of key versions: states, the transitions between them, the primary version, rotation.

The model is Google Cloud KMS's, which follows NIST SP 800-57 Part 1 (section 7, key states): a key has
numbered versions; each version is in one state; one version of the key is its *primary* and is the one used
for new work (signing, wrapping device secrets); other enabled versions still verify or unwrap what they
made; nothing signs, wraps or unwraps with a version that is not enabled.

States and transitions (``TRANSITIONS``)::

    ENABLED ───────► DISABLED            disable: the version stops being used, its material stays
    DISABLED ──────► ENABLED             enable
    ENABLED ───────► DESTROY_SCHEDULED   schedule destruction: due at now + delay
    DISABLED ──────► DESTROY_SCHEDULED   (default delay 24 h; at least 1 h, at most 120 days)
    DESTROY_SCHEDULED ► DISABLED         cancel the destruction (never straight back to ENABLED)
    DESTROY_SCHEDULED ► DESTROYED        only once due; the HSM material is destroyed then
    DESTROYED                            final: nothing leaves it

Asking for the state a version already has is no transition: it changes and records nothing, so a retried
request is harmless (a retried "schedule destruction" keeps the first due time).

The minimum delay (``MIN_DESTROY_DELAY``, one hour) leaves an officer time to notice a mistaken destruction
and cancel it; the default (``DEFAULT_DESTROY_DELAY``) is a day.

The primary version
-------------------
The rule the functions here keep (``check_primary``): if the key has any enabled version, its primary is
enabled. Hence:

- the primary cannot leave ENABLED while other versions are enabled, unless the same request names one of
  them as the new primary (``new_primary``);
- the primary *may* leave ENABLED when it is the only enabled version: the key then has no enabled version
  and nothing can use it until a version is enabled again or the key is rotated;
- enabling a version of a key whose primary is not enabled makes that version the primary;
- ``rotate`` adds version n+1 (n the highest number so far, destroyed versions included: numbers are never
  reused), enabled, and makes it the primary;
- the primary of an OTA manifest key only moves forward: any request that would make a version numbered
  *lower* than the current primary the primary (``set_primary``, a new primary named when the primary leaves
  ENABLED, enabling an older version while the primary is not enabled) is refused (``FailedPrecondition``:
  rotate instead). Each rotation of such a key has the primary sign the new version's rollover statement,
  and devices move from key to key by those statements alone; a primary moved back would sign a second
  branch, and a replayed statement of the abandoned branch would strand a device on a key no later
  statement leaves (``docs/manifest-key-rollover.md``). With the rule, each version of a manifest key signs
  at most one stored statement and its statements form one chain (broken only at gaps: versions made while
  the primary was not enabled have none), so a replayed statement can move a device only forward along it.

Rotation schedule
-----------------
A key may have a ``RotationSchedule``: a period (whole seconds, from a day to 100 years) and the time of the
next rotation, which every rotation (scheduled or on demand) moves to rotation time + period. Secure Boot V2
keys get no schedule: the digest of their public key is burned into the chips' eFuses, so a new version does
not boot on a device already in the field and must be an officer's deliberate choice.

How the functions are used
--------------------------
Everything here is pure. A use case reads a ``ManagedKey`` (the ``Key`` with its destruction due times and
rotation schedule), calls one function with the request, the actor and the time, and gets back a
``LifecycleChange``: the version states to write, the new primary, a new version, the next rotation time and
the ``Transition`` records (who, when, from, to). The store applies a change in one transaction, and only if
the key is still exactly as it was read (every version's state and the primary, ``based_on``), so two
officers, or an officer and the scheduler, cannot interleave two changes that are each valid alone.
Refusals are ``FailedPrecondition`` (the rule refuses it in this state) or ``InvalidArgument`` (the request
itself is malformed), with messages naming the version and what to do instead.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from kms.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from kms.domain.keys import Key, KeyName, KeyPurpose, KeyVersion, KeyVersionState
from kms.domain.releases import SignatureRecord
from kms.domain.rollover import ManifestKeyRollover

ENABLED = KeyVersionState.ENABLED
DISABLED = KeyVersionState.DISABLED
DESTROY_SCHEDULED = KeyVersionState.DESTROY_SCHEDULED
DESTROYED = KeyVersionState.DESTROYED

TRANSITIONS: Mapping[KeyVersionState, frozenset[KeyVersionState]] = MappingProxyType(
    {
        ENABLED: frozenset({DISABLED, DESTROY_SCHEDULED}),
        DISABLED: frozenset({ENABLED, DESTROY_SCHEDULED}),
        DESTROY_SCHEDULED: frozenset({DISABLED, DESTROYED}),
        DESTROYED: frozenset(),
    }
)
"""The states each state may move to (a state to itself is no transition, see the module docstring)."""

DEFAULT_DESTROY_DELAY = timedelta(hours=24)
MIN_DESTROY_DELAY = timedelta(hours=1)
MAX_DESTROY_DELAY = timedelta(days=120)

MIN_ROTATION_PERIOD = timedelta(days=1)
MAX_ROTATION_PERIOD = timedelta(days=36500)


class LifecycleEvent(enum.Enum):
    """What a ``Transition`` records. The value is the name stored and shown to auditors."""

    CREATED = "created"  # a new version, enabled (no state before)
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTROY_SCHEDULED = "destroy-scheduled"
    DESTROY_CANCELLED = "destroy-cancelled"
    DESTROYED = "destroyed"
    MADE_PRIMARY = "made-primary"  # the version became the key's primary (its state does not change)


_EVENT_OF_TARGET = {
    ENABLED: LifecycleEvent.ENABLED,
    DISABLED: LifecycleEvent.DISABLED,
    DESTROY_SCHEDULED: LifecycleEvent.DESTROY_SCHEDULED,
    DESTROYED: LifecycleEvent.DESTROYED,
}


def _aware(moment: datetime, what: str) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidArgument(f"{what} must carry a time zone")
    return moment


def _when(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


@dataclass(frozen=True)
class Transition:
    """One recorded lifecycle event of a key version: who did what, when, from which state to which.

    ``from_state`` is None for ``CREATED``; for ``MADE_PRIMARY`` both states are the version's (unchanged)
    state. ``destroy_after`` is set for ``DESTROY_SCHEDULED``: when the destruction falls due.
    """

    key_id: str
    version: int
    event: LifecycleEvent
    from_state: KeyVersionState | None
    to_state: KeyVersionState
    actor: str
    at: datetime
    destroy_after: datetime | None = None

    def __post_init__(self) -> None:
        _aware(self.at, "a transition time")
        if not self.actor:
            raise InvalidArgument("a transition needs an actor")

    @property
    def name(self) -> str:
        """The key version's name, ``keys/{key_id}/versions/{version}``."""
        return str(KeyName(self.key_id, self.version))


@dataclass(frozen=True)
class RotationSchedule:
    """Rotate every ``period``; the next rotation is due at ``next_rotation_at``."""

    period: timedelta
    next_rotation_at: datetime

    def __post_init__(self) -> None:
        check_rotation_period(self.period)
        _aware(self.next_rotation_at, "the next rotation time")

    def is_due(self, now: datetime) -> bool:
        return now >= self.next_rotation_at

    def after_rotation(self, rotated_at: datetime) -> RotationSchedule:
        """The schedule once the key was rotated (on demand or on schedule) at ``rotated_at``."""
        return replace(self, next_rotation_at=rotated_at + self.period)


@dataclass(frozen=True)
class ManagedKey:
    """A key with the lifecycle data ``Key`` does not carry, as read from the store in one snapshot.

    ``destroy_after`` maps each DESTROY_SCHEDULED version (and only those) to the time its destruction falls
    due; ``rotation`` is the key's rotation schedule, or None for rotation on demand only.
    """

    key: Key
    destroy_after: Mapping[int, datetime] = field(default_factory=dict)
    rotation: RotationSchedule | None = None

    def __post_init__(self) -> None:
        scheduled = {v.version for v in self.key.versions if v.state is DESTROY_SCHEDULED}
        if set(self.destroy_after) != scheduled:
            raise InvalidArgument(
                f"key {self.key.name}: exactly the versions scheduled for destruction have a due time"
            )

    def version(self, number: int) -> KeyVersion:
        """The version numbered ``number``; ``NotFound`` if there is none."""
        try:
            return self.key.version(number)
        except LookupError:
            raise NotFound(f"key {self.key.name} has no version {number}") from None

    @property
    def enabled_versions(self) -> tuple[int, ...]:
        return tuple(v.version for v in self.key.versions if v.state is ENABLED)


@dataclass(frozen=True)
class VersionUpdate:
    """Write ``state`` (and ``destroy_after``: set for DESTROY_SCHEDULED, cleared otherwise) to a version."""

    version: int
    state: KeyVersionState
    destroy_after: datetime | None = None


@dataclass(frozen=True)
class LifecycleChange:
    """What one lifecycle request writes, to be applied atomically by the store.

    The store applies it only if the key's versions and their states are still ``based_on`` and its primary
    is still ``based_on_primary``; otherwise it refuses (someone changed the key meanwhile) and writes
    nothing. ``next_rotation_at`` None leaves the stored rotation time as it is. ``rollover`` is the
    statement introducing an OTA manifest key's ``new_version`` (``kms.domain.rollover``) and ``key_uses``
    the key uses made to sign it; both are written in the same transaction as the rest.
    """

    key_id: str
    based_on: tuple[tuple[int, KeyVersionState], ...]
    based_on_primary: int
    primary: int
    updates: tuple[VersionUpdate, ...] = ()
    new_version: KeyVersion | None = None
    next_rotation_at: datetime | None = None
    transitions: tuple[Transition, ...] = ()
    rollover: ManifestKeyRollover | None = None
    key_uses: tuple[SignatureRecord, ...] = ()

    @property
    def is_empty(self) -> bool:
        """True when the request asked for what already is: nothing to write or record."""
        return not self.transitions


def _snapshot(key: Key) -> tuple[tuple[int, KeyVersionState], ...]:
    return tuple((v.version, v.state) for v in key.versions)


def _unchanged(key: Key) -> LifecycleChange:
    return LifecycleChange(key.key_id, _snapshot(key), key.primary_version, key.primary_version)


def check_destroy_delay(delay: timedelta) -> timedelta:
    """``delay`` if within [``MIN_DESTROY_DELAY``, ``MAX_DESTROY_DELAY``]; else ``InvalidArgument``."""
    if not MIN_DESTROY_DELAY <= delay <= MAX_DESTROY_DELAY:
        raise InvalidArgument(
            f"a destruction delay must be between {MIN_DESTROY_DELAY} and {MAX_DESTROY_DELAY.days} days "
            f"(a window to cancel a mistaken destruction); got {delay}"
        )
    return delay


def check_rotation_period(period: timedelta) -> timedelta:
    """``period`` if it is whole seconds within [``MIN_ROTATION_PERIOD``, ``MAX_ROTATION_PERIOD``]."""
    if not MIN_ROTATION_PERIOD <= period <= MAX_ROTATION_PERIOD:
        raise InvalidArgument(
            f"a rotation period must be between {MIN_ROTATION_PERIOD.days} day and "
            f"{MAX_ROTATION_PERIOD.days} days; got {period}"
        )
    if period % timedelta(seconds=1):
        raise InvalidArgument(f"a rotation period must be whole seconds; got {period}")
    return period


def check_primary(states: Mapping[int, KeyVersionState], primary: int) -> None:
    """``FailedPrecondition`` unless ``primary`` is a version and, if any version is enabled, enabled."""
    if primary not in states:
        raise FailedPrecondition(f"the primary version {primary} does not exist")
    if states[primary] is not ENABLED and ENABLED in states.values():
        raise FailedPrecondition(
            f"the primary version {primary} is {states[primary].value} while other versions are enabled"
        )


def _new_primary(managed: ManagedKey, number: int, target: KeyVersionState, new_primary: int | None) -> int:
    """The primary after ``number`` moves to ``target`` (the rules of the module docstring).

    Every request that may change the primary (a transition, ``set_primary``, ``schedule_destroy`` with a
    new primary) decides it here and only here, so the forward-only rule of OTA manifest keys
    (``_forward_only``) covers them all; ``rotate`` always moves the primary up to a new, highest number.
    """
    return _forward_only(managed.key, _primary_after(managed, number, target, new_primary))


def _forward_only(key: Key, primary: int) -> int:
    """``primary`` unless ``key`` is an OTA manifest key and ``primary`` is below its current primary.

    Every rotation of a manifest key has the primary of the moment sign the new version's rollover
    statement (``kms.domain.rollover``), and a device moves to the new key by that statement alone, whenever
    it gets it. Were the primary moved back to version M < N, the next rotation would make a statement
    M -> N+1 beside the existing M -> ... -> N: two branches, and a device still trusting M would accept a
    replay of the old branch's statements, trust N and never reach N+1 (N signs nothing more). Keeping the
    primary non-decreasing keeps every statement on one chain.
    """
    if key.purpose is KeyPurpose.OTA_MANIFEST and primary < key.primary_version:
        raise FailedPrecondition(
            f"{KeyName(key.key_id, primary)} cannot become the primary of OTA manifest key {key.name}: "
            f"devices may already trust version {key.primary_version} through its rollover statement; a "
            "manifest key moves forward only: rotate instead"
        )
    return primary


def _primary_after(managed: ManagedKey, number: int, target: KeyVersionState, new_primary: int | None) -> int:
    key = managed.key
    enabled_after = set(managed.enabled_versions) - {number} | ({number} if target is ENABLED else set())
    if new_primary is not None:
        if new_primary not in enabled_after:
            raise FailedPrecondition(
                f"version {new_primary} of {key.name} cannot become primary: only an enabled version can"
            )
        return new_primary
    if number == key.primary_version and target is not ENABLED and enabled_after:
        if key.purpose is KeyPurpose.OTA_MANIFEST and not any(n > number for n in enabled_after):
            raise FailedPrecondition(  # older versions cannot become primary (_forward_only): rotate
                f"{KeyName(key.key_id, number)} is the primary version of OTA manifest key {key.name}, whose "
                "primary moves forward only: rotate the key first (the new version becomes the primary), "
                "then disable or destroy this version"
            )
        others = ", ".join(
            str(n) for n in sorted(enabled_after) if key.purpose is not KeyPurpose.OTA_MANIFEST or n > number
        )
        raise FailedPrecondition(
            f"{KeyName(key.key_id, number)} is the primary version of {key.name}; make another enabled "
            f"version ({others}) primary first, or name it as the new primary in the same request"
        )
    primary_state = managed.version(key.primary_version).state
    if target is ENABLED and primary_state is not ENABLED:
        return number  # the key had no enabled version: the one enabled now serves new work
    return key.primary_version


_SCHEDULE_FIRST = "schedule its destruction; it is destroyed once the delay has passed"
_HINTS = {
    (DESTROY_SCHEDULED, ENABLED): "cancel the destruction first (the version becomes disabled), then enable",
    (ENABLED, DESTROYED): _SCHEDULE_FIRST,
    (DISABLED, DESTROYED): _SCHEDULE_FIRST,
}


def _refusal(version: KeyVersion, target: KeyVersionState) -> FailedPrecondition:
    hint = _HINTS.get((version.state, target), "")
    if version.state is DESTROYED:
        hint = "destroyed versions are gone for good"
    return FailedPrecondition(
        f"key version {version.name} is {version.state.value}; it cannot become {target.value}"
        + (f": {hint}" if hint else "")
    )


def transition(
    managed: ManagedKey,
    number: int,
    target: KeyVersionState,
    actor: str,
    now: datetime,
    *,
    destroy_delay: timedelta = DEFAULT_DESTROY_DELAY,
    new_primary: int | None = None,
) -> LifecycleChange:
    """Move version ``number`` to ``target`` (see ``TRANSITIONS``), keeping a valid primary.

    ``destroy_delay`` applies to DESTROY_SCHEDULED; DESTROYED is refused before the version's due time.
    ``new_primary`` names an enabled version (after the change) to make primary in the same request.
    """
    _aware(now, "the current time")
    if target is DESTROY_SCHEDULED:
        check_destroy_delay(destroy_delay)
    key = managed.key
    version = managed.version(number)
    if target is version.state and (new_primary is None or new_primary == key.primary_version):
        return _unchanged(key)
    if target is not version.state and target not in TRANSITIONS[version.state]:
        raise _refusal(version, target)
    destroy_after = None
    if target is DESTROY_SCHEDULED and version.state is not DESTROY_SCHEDULED:
        destroy_after = now + destroy_delay
    if target is DESTROYED and version.state is DESTROY_SCHEDULED:
        due = managed.destroy_after[number]
        if now < due:
            raise FailedPrecondition(
                f"key version {version.name} is scheduled for destruction at {_when(due)}; it cannot be "
                "destroyed before then"
            )
    primary = _new_primary(managed, number, target, new_primary)

    transitions: list[Transition] = []
    updates: list[VersionUpdate] = []
    if target is not version.state:
        event = _EVENT_OF_TARGET[target]
        if version.state is DESTROY_SCHEDULED and target is DISABLED:
            event = LifecycleEvent.DESTROY_CANCELLED
        updates.append(VersionUpdate(number, target, destroy_after))
        transitions.append(
            Transition(key.key_id, number, event, version.state, target, actor, now, destroy_after)
        )
    if primary != key.primary_version:
        transitions.append(_made_primary(key.key_id, primary, actor, now))
    states = dict(_snapshot(key)) | {u.version: u.state for u in updates}
    check_primary(states, primary)
    return LifecycleChange(
        key.key_id,
        _snapshot(key),
        key.primary_version,
        primary,
        updates=tuple(updates),
        transitions=tuple(transitions),
    )


def _made_primary(key_id: str, number: int, actor: str, now: datetime) -> Transition:
    return Transition(key_id, number, LifecycleEvent.MADE_PRIMARY, ENABLED, ENABLED, actor, now)


def schedule_destroy(
    managed: ManagedKey,
    number: int,
    actor: str,
    now: datetime,
    *,
    delay: timedelta = DEFAULT_DESTROY_DELAY,
    new_primary: int | None = None,
) -> LifecycleChange:
    """Schedule version ``number``'s destruction at ``now + delay``."""
    return transition(
        managed, number, DESTROY_SCHEDULED, actor, now, destroy_delay=delay, new_primary=new_primary
    )


def cancel_destroy(managed: ManagedKey, number: int, actor: str, now: datetime) -> LifecycleChange:
    """Cancel a scheduled destruction: the version becomes DISABLED (enable it afterwards if wanted)."""
    version = managed.version(number)
    if version.state is not DESTROY_SCHEDULED:
        raise FailedPrecondition(
            f"key version {version.name} is {version.state.value}; only a version scheduled for destruction "
            "can have its destruction cancelled"
        )
    return transition(managed, number, DISABLED, actor, now)


def set_primary(managed: ManagedKey, number: int, actor: str, now: datetime) -> LifecycleChange:
    """Make enabled version ``number`` the key's primary."""
    _aware(now, "the current time")
    version = managed.version(number)
    if version.state is not ENABLED:
        raise FailedPrecondition(
            f"key version {version.name} is {version.state.value}; only an enabled version can be primary"
        )
    return transition(managed, number, ENABLED, actor, now, new_primary=number)


def next_version_number(key: Key) -> int:
    """The number the next version gets: one above every number used so far (never reused)."""
    return max((v.version for v in key.versions), default=0) + 1


def rotate(
    managed: ManagedKey, hsm_id: bytes, public_key_der: bytes, actor: str, now: datetime
) -> LifecycleChange:
    """Add version n+1 with this HSM material, enabled, and make it the primary.

    Moves the next scheduled rotation (if the key has a schedule) to ``now`` + the period.
    """
    _aware(now, "the current time")
    key = managed.key
    number = next_version_number(key)
    version = KeyVersion(key.key_id, number, key.algorithm, ENABLED, hsm_id, public_key_der, now)
    transitions = (
        Transition(key.key_id, number, LifecycleEvent.CREATED, None, ENABLED, actor, now),
        _made_primary(key.key_id, number, actor, now),
    )
    rotation = managed.rotation.after_rotation(now) if managed.rotation else None
    return LifecycleChange(
        key.key_id,
        _snapshot(key),
        key.primary_version,
        number,
        new_version=version,
        next_rotation_at=rotation.next_rotation_at if rotation else None,
        transitions=transitions,
    )


def creation(key: Key, actor: str) -> LifecycleChange:
    """The records of a key's creation, as a change writing nothing else: each version CREATED (at its
    creation time), then the primary MADE_PRIMARY."""
    primary = key.version()
    records = [
        Transition(key.key_id, v.version, LifecycleEvent.CREATED, None, v.state, actor, v.created_at)
        for v in key.versions
    ]
    records.append(
        Transition(
            key.key_id,
            primary.version,
            LifecycleEvent.MADE_PRIMARY,
            primary.state,
            primary.state,
            actor,
            primary.created_at,
        )
    )
    return replace(_unchanged(key), transitions=tuple(records))


def rotation_schedule(
    key: Key, period: timedelta, now: datetime, first_rotation: datetime | None = None
) -> RotationSchedule:
    """A schedule rotating ``key`` every ``period``, first at ``first_rotation`` (default now + period)."""
    _aware(now, "the current time")
    if key.purpose is KeyPurpose.SECURE_BOOT_V2:
        raise FailedPrecondition(
            f"{key.name} is a Secure Boot V2 key: devices in the field trust only the key digests burned "
            "into their eFuses, so a new version must be an officer's deliberate choice; rotate it on demand"
        )
    check_rotation_period(period)
    first = _aware(first_rotation, "the first rotation time") if first_rotation else now + period
    return RotationSchedule(period, first)


def next_rotation_time(managed: ManagedKey) -> datetime | None:
    """When the key is next rotated on schedule, or None if it is rotated on demand only."""
    return managed.rotation.next_rotation_at if managed.rotation else None


def scheduled_rotation_is_due(managed: ManagedKey, now: datetime) -> bool:
    """True when the schedule says rotate now and the key has an enabled version.

    A key with no enabled version is left alone: an officer disabled it on purpose, and a rotation would
    bring it back into service. Its rotation stays due and happens once a version is enabled again.
    """
    return managed.rotation is not None and managed.rotation.is_due(now) and bool(managed.enabled_versions)
