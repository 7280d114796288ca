"""The pure lifecycle rules (kms.domain.lifecycle): every (from, to) pair, the primary, delays, rotation."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.domain import lifecycle
from kms.domain.errors import FailedPrecondition, InvalidArgument, NotFound
from kms.domain.keys import Algorithm, Key, KeyPurpose, KeyVersion, KeyVersionState
from kms.domain.lifecycle import (
    DEFAULT_DESTROY_DELAY,
    MAX_DESTROY_DELAY,
    MIN_DESTROY_DELAY,
    MIN_ROTATION_PERIOD,
    TRANSITIONS,
    LifecycleChange,
    LifecycleEvent,
    ManagedKey,
    RotationSchedule,
    Transition,
    VersionUpdate,
)

ENABLED = KeyVersionState.ENABLED
DISABLED = KeyVersionState.DISABLED
SCHEDULED = KeyVersionState.DESTROY_SCHEDULED
DESTROYED = KeyVersionState.DESTROYED
STATES = list(KeyVersionState)

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
DUE = T0 + DEFAULT_DESTROY_DELAY
LATER = T0 + timedelta(days=2)  # past every due time used here
ALICE = "spiffe://kms.example/security-officer/alice"


def make_key(
    *states: KeyVersionState, primary: int = 1, purpose: KeyPurpose = KeyPurpose.DIGEST_SIGNING
) -> Key:
    versions = tuple(
        KeyVersion("fw", n, Algorithm.ECDSA_P256_SHA256, state, bytes([n]) * 16, b"der", T0)
        for n, state in enumerate(states, start=1)
    )
    return Key("fw", "thermostat", purpose, Algorithm.ECDSA_P256_SHA256, None, primary, versions, T0)


def managed(
    *states: KeyVersionState,
    primary: int = 1,
    rotation: RotationSchedule | None = None,
    purpose: KeyPurpose = KeyPurpose.DIGEST_SIGNING,
) -> ManagedKey:
    key = make_key(*states, primary=primary, purpose=purpose)
    due = {v.version: DUE for v in key.versions if v.state is SCHEDULED}
    return ManagedKey(key, due, rotation)


def applied(key: ManagedKey, change: LifecycleChange) -> ManagedKey:
    """What the store holds after applying ``change`` to ``key`` (the store's job, done in memory)."""
    assert change.based_on == tuple((v.version, v.state) for v in key.key.versions)
    assert change.based_on_primary == key.key.primary_version
    updates = {u.version: u for u in change.updates}
    versions = [
        replace(v, state=updates[v.version].state) if v.version in updates else v for v in key.key.versions
    ]
    if change.new_version is not None:
        versions.append(change.new_version)
    due = {n: t for n, t in key.destroy_after.items() if n not in updates}
    due |= {u.version: u.destroy_after for u in change.updates if u.destroy_after is not None}
    rotation = key.rotation
    if rotation is not None and change.next_rotation_at is not None:
        rotation = replace(rotation, next_rotation_at=change.next_rotation_at)
    new_key = replace(key.key, versions=tuple(versions), primary_version=change.primary)
    return ManagedKey(new_key, due, rotation)


# --- the table ------------------------------------------------------------------------------------------


def test_the_transition_table_is_the_documented_one() -> None:
    allowed = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert allowed == {
        (ENABLED, DISABLED),
        (ENABLED, SCHEDULED),
        (DISABLED, ENABLED),
        (DISABLED, SCHEDULED),
        (SCHEDULED, DISABLED),
        (SCHEDULED, DESTROYED),
    }
    assert set(TRANSITIONS) == set(KeyVersionState)
    assert TRANSITIONS[DESTROYED] == frozenset()


@pytest.mark.parametrize(("start", "target"), list(itertools.product(STATES, STATES)), ids=lambda s: s.value)
def test_every_pair_of_states_of_a_non_primary_version(
    start: KeyVersionState, target: KeyVersionState
) -> None:
    key = managed(ENABLED, start)
    if target is start:
        change = lifecycle.transition(key, 2, target, ALICE, LATER)
        assert change.is_empty
        assert change.updates == () and change.primary == 1
        return
    if target not in TRANSITIONS[start]:
        with pytest.raises(FailedPrecondition, match=f"is {start.value}; it cannot become {target.value}"):
            lifecycle.transition(key, 2, target, ALICE, LATER)
        return
    change = lifecycle.transition(key, 2, target, ALICE, LATER)
    destroy_after = LATER + DEFAULT_DESTROY_DELAY if target is SCHEDULED else None
    assert change.updates == (VersionUpdate(2, target, destroy_after),)
    assert change.primary == 1 and change.new_version is None
    event = {
        ENABLED: LifecycleEvent.ENABLED,
        DISABLED: LifecycleEvent.DESTROY_CANCELLED if start is SCHEDULED else LifecycleEvent.DISABLED,
        SCHEDULED: LifecycleEvent.DESTROY_SCHEDULED,
        DESTROYED: LifecycleEvent.DESTROYED,
    }[target]
    assert change.transitions == (Transition("fw", 2, event, start, target, ALICE, LATER, destroy_after),)
    after = applied(key, change)
    assert after.version(2).state is target
    assert set(after.destroy_after) == ({2} if target is SCHEDULED else set())


def test_refusals_say_what_to_do_instead() -> None:
    with pytest.raises(FailedPrecondition, match="cancel the destruction first"):
        lifecycle.transition(managed(ENABLED, SCHEDULED), 2, ENABLED, ALICE, LATER)
    with pytest.raises(FailedPrecondition, match="schedule its destruction"):
        lifecycle.transition(managed(ENABLED, DISABLED), 2, DESTROYED, ALICE, LATER)
    with pytest.raises(FailedPrecondition, match="gone for good"):
        lifecycle.transition(managed(ENABLED, DESTROYED), 2, ENABLED, ALICE, LATER)


def test_an_unknown_version_is_not_found() -> None:
    with pytest.raises(NotFound, match="key keys/fw has no version 7"):
        lifecycle.transition(managed(ENABLED), 7, DISABLED, ALICE, LATER)


def test_times_must_carry_a_time_zone() -> None:
    with pytest.raises(InvalidArgument, match="time zone"):
        lifecycle.transition(managed(ENABLED, ENABLED), 2, DISABLED, ALICE, datetime(2025, 1, 1))


# --- destruction ----------------------------------------------------------------------------------------


def test_destruction_is_due_after_the_delay_and_not_before() -> None:
    key = managed(ENABLED, ENABLED)
    change = lifecycle.schedule_destroy(key, 2, ALICE, T0)
    assert change.updates == (VersionUpdate(2, SCHEDULED, T0 + timedelta(hours=24)),)
    scheduled = applied(key, change)
    with pytest.raises(FailedPrecondition, match=r"scheduled for destruction at 2025-03-02T09:00:00\+00:00"):
        lifecycle.transition(scheduled, 2, DESTROYED, "kms:scheduler", DUE - timedelta(seconds=1))
    destroyed = applied(scheduled, lifecycle.transition(scheduled, 2, DESTROYED, "kms:scheduler", DUE))
    assert destroyed.version(2).state is DESTROYED and not destroyed.destroy_after


def test_the_delay_is_configurable_within_documented_bounds() -> None:
    key = managed(ENABLED, ENABLED)
    for delay in (MIN_DESTROY_DELAY, MAX_DESTROY_DELAY, timedelta(days=30)):
        change = lifecycle.schedule_destroy(key, 2, ALICE, T0, delay=delay)
        assert change.updates[0].destroy_after == T0 + delay
    for delay in (MIN_DESTROY_DELAY - timedelta(seconds=1), MAX_DESTROY_DELAY + timedelta(seconds=1)):
        with pytest.raises(InvalidArgument, match="between 1:00:00 and 120 days"):
            lifecycle.schedule_destroy(key, 2, ALICE, T0, delay=delay)
    assert lifecycle.check_destroy_delay(DEFAULT_DESTROY_DELAY) == timedelta(hours=24)


def test_scheduling_again_keeps_the_first_due_time() -> None:
    key = applied(
        managed(ENABLED, ENABLED), lifecycle.schedule_destroy(managed(ENABLED, ENABLED), 2, ALICE, T0)
    )
    assert lifecycle.schedule_destroy(key, 2, ALICE, LATER).is_empty
    assert key.destroy_after == {2: DUE}


def test_cancel_makes_the_version_disabled_not_enabled() -> None:
    key = managed(ENABLED, SCHEDULED)
    change = lifecycle.cancel_destroy(key, 2, ALICE, T0)
    assert change.updates == (VersionUpdate(2, DISABLED, None),)
    assert change.transitions[0].event is LifecycleEvent.DESTROY_CANCELLED
    for state in (ENABLED, DISABLED, DESTROYED):
        with pytest.raises(FailedPrecondition, match="only a version scheduled for destruction"):
            lifecycle.cancel_destroy(managed(ENABLED, state), 2, ALICE, T0)


def test_a_managed_key_has_due_times_for_exactly_its_scheduled_versions() -> None:
    with pytest.raises(InvalidArgument, match="exactly the versions scheduled"):
        ManagedKey(make_key(ENABLED, SCHEDULED), {})
    with pytest.raises(InvalidArgument, match="exactly the versions scheduled"):
        ManagedKey(make_key(ENABLED, DISABLED), {2: DUE})


# --- the primary ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [DISABLED, SCHEDULED])
def test_the_primary_leaves_enabled_only_with_a_successor(target: KeyVersionState) -> None:
    key = managed(ENABLED, ENABLED, DISABLED)
    with pytest.raises(FailedPrecondition, match=r"keys/fw/versions/1 is the primary .* \(2\) primary first"):
        lifecycle.transition(key, 1, target, ALICE, T0)
    change = lifecycle.transition(key, 1, target, ALICE, T0, new_primary=2)
    assert change.primary == 2
    assert change.transitions[-1] == Transition(
        "fw", 2, LifecycleEvent.MADE_PRIMARY, ENABLED, ENABLED, ALICE, T0
    )
    for wrong in (1, 3, 9):  # the version leaving, a disabled one, none
        with pytest.raises(FailedPrecondition, match=f"version {wrong} of keys/fw cannot become primary"):
            lifecycle.transition(key, 1, target, ALICE, T0, new_primary=wrong)


def test_the_only_enabled_version_may_be_disabled_leaving_no_enabled_version() -> None:
    key = managed(ENABLED, DISABLED)
    after = applied(key, lifecycle.transition(key, 1, DISABLED, ALICE, T0))
    assert after.key.primary_version == 1 and after.enabled_versions == ()
    after = applied(after, lifecycle.schedule_destroy(after, 1, ALICE, T0))
    after = applied(after, lifecycle.transition(after, 1, DESTROYED, ALICE, LATER))
    assert after.key.primary_version == 1 and after.version(1).state is DESTROYED


def test_enabling_a_version_of_a_key_without_an_enabled_primary_makes_it_primary() -> None:
    key = managed(DISABLED, DISABLED)
    change = lifecycle.transition(key, 2, ENABLED, ALICE, T0)
    assert change.primary == 2
    assert [t.event for t in change.transitions] == [LifecycleEvent.ENABLED, LifecycleEvent.MADE_PRIMARY]
    again = lifecycle.transition(key, 1, ENABLED, ALICE, T0)  # the primary itself: no primary change
    assert again.primary == 1 and [t.event for t in again.transitions] == [LifecycleEvent.ENABLED]


def test_set_primary() -> None:
    key = managed(ENABLED, ENABLED, DISABLED)
    change = lifecycle.set_primary(key, 2, ALICE, T0)
    assert change.primary == 2 and change.updates == ()
    assert [t.event for t in change.transitions] == [LifecycleEvent.MADE_PRIMARY]
    assert lifecycle.set_primary(key, 1, ALICE, T0).is_empty
    with pytest.raises(FailedPrecondition, match="is disabled; only an enabled version can be primary"):
        lifecycle.set_primary(key, 3, ALICE, T0)


MANIFEST = KeyPurpose.OTA_MANIFEST
BACKWARDS = (
    "devices may already trust version 3 through its rollover statement; a manifest key moves forward only"
)


def test_a_manifest_key_refuses_set_primary_to_an_older_version() -> None:
    key = managed(ENABLED, ENABLED, ENABLED, primary=3, purpose=MANIFEST)
    for older in (1, 2):
        with pytest.raises(
            FailedPrecondition, match=f"versions/{older} cannot become the primary.*{BACKWARDS}"
        ):
            lifecycle.set_primary(key, older, ALICE, T0)
    assert lifecycle.set_primary(key, 3, ALICE, T0).is_empty
    # the same request on any other key is allowed: the rule is the manifest key's alone
    assert lifecycle.set_primary(managed(ENABLED, ENABLED, ENABLED, primary=3), 1, ALICE, T0).primary == 1


@pytest.mark.parametrize("target", [DISABLED, SCHEDULED])
def test_a_manifest_key_refuses_an_older_successor_when_the_primary_leaves(target: KeyVersionState) -> None:
    key = managed(ENABLED, ENABLED, ENABLED, primary=3, purpose=MANIFEST)
    with pytest.raises(FailedPrecondition, match=BACKWARDS):
        lifecycle.transition(key, 3, target, ALICE, T0, new_primary=2)
    with pytest.raises(FailedPrecondition, match=BACKWARDS):
        lifecycle.schedule_destroy(key, 3, ALICE, T0, new_primary=1)
    # another version may leave while the primary stays; naming the primary itself is no change of it
    change = lifecycle.transition(key, 1, target, ALICE, T0, new_primary=3)
    event = LifecycleEvent.DISABLED if target is DISABLED else LifecycleEvent.DESTROY_SCHEDULED
    assert change.primary == 3 and [t.event for t in change.transitions] == [event]


def test_a_manifest_key_refuses_enabling_an_older_version_while_its_primary_is_not_enabled() -> None:
    for primary_state in (DISABLED, SCHEDULED, DESTROYED):
        key = managed(DISABLED, DISABLED, primary_state, primary=3, purpose=MANIFEST)
        with pytest.raises(FailedPrecondition, match=BACKWARDS):
            lifecycle.transition(key, 1, ENABLED, ALICE, T0)
        with pytest.raises(FailedPrecondition, match=BACKWARDS):
            lifecycle.transition(key, 2, ENABLED, ALICE, T0)
    change = lifecycle.transition(
        managed(DISABLED, DISABLED, DISABLED, primary=3, purpose=MANIFEST), 3, ENABLED, ALICE, T0
    )
    assert change.primary == 3
    rotated = lifecycle.rotate(
        managed(DISABLED, DISABLED, DESTROYED, primary=3, purpose=MANIFEST), b"h", b"", ALICE, T0
    )
    assert rotated.primary == 4, "rotation is the way forward"


def test_a_manifest_key_primary_may_move_forward() -> None:
    """Only a primary left behind by data written before the rule can be below another enabled version."""
    key = managed(ENABLED, ENABLED, ENABLED, primary=1, purpose=MANIFEST)
    assert lifecycle.set_primary(key, 3, ALICE, T0).primary == 3
    assert lifecycle.transition(key, 1, DISABLED, ALICE, T0, new_primary=2).primary == 2
    disabled = managed(DISABLED, DISABLED, primary=1, purpose=MANIFEST)
    assert lifecycle.transition(disabled, 2, ENABLED, ALICE, T0).primary == 2


def test_check_primary() -> None:
    lifecycle.check_primary({1: ENABLED, 2: DISABLED}, 1)
    lifecycle.check_primary({1: DESTROYED, 2: DISABLED}, 1)
    with pytest.raises(FailedPrecondition, match="primary version 1 is disabled while other"):
        lifecycle.check_primary({1: DISABLED, 2: ENABLED}, 1)
    with pytest.raises(FailedPrecondition, match="does not exist"):
        lifecycle.check_primary({1: ENABLED}, 2)


def test_creation_records_every_version_and_the_primary() -> None:
    change = lifecycle.creation(make_key(ENABLED), ALICE)
    assert change.updates == () and change.primary == 1
    assert change.transitions == (
        Transition("fw", 1, LifecycleEvent.CREATED, None, ENABLED, ALICE, T0),
        Transition("fw", 1, LifecycleEvent.MADE_PRIMARY, ENABLED, ENABLED, ALICE, T0),
    )


# --- rotation -------------------------------------------------------------------------------------------


def test_rotation_adds_the_next_number_enabled_and_primary() -> None:
    key = managed(ENABLED, DESTROYED, DISABLED)
    change = lifecycle.rotate(key, b"\x09" * 16, b"new-der", ALICE, T0)
    assert change.new_version == KeyVersion(
        "fw", 4, Algorithm.ECDSA_P256_SHA256, ENABLED, b"\x09" * 16, b"new-der", T0
    )
    assert change.primary == 4 and change.next_rotation_at is None
    assert change.transitions == (
        Transition("fw", 4, LifecycleEvent.CREATED, None, ENABLED, ALICE, T0),
        Transition("fw", 4, LifecycleEvent.MADE_PRIMARY, ENABLED, ENABLED, ALICE, T0),
    )
    after = applied(key, change)
    lifecycle.check_primary({v.version: v.state for v in after.key.versions}, after.key.primary_version)


def test_rotation_moves_the_next_scheduled_rotation() -> None:
    schedule = RotationSchedule(timedelta(days=90), T0)
    change = lifecycle.rotate(managed(ENABLED, rotation=schedule), b"\x09" * 16, b"", "kms:scheduler", LATER)
    assert change.next_rotation_at == LATER + timedelta(days=90)


def test_rotation_schedule_rules() -> None:
    key = make_key(ENABLED)
    schedule = lifecycle.rotation_schedule(key, timedelta(days=30), T0)
    assert schedule == RotationSchedule(timedelta(days=30), T0 + timedelta(days=30))
    assert lifecycle.rotation_schedule(key, timedelta(days=30), T0, LATER).next_rotation_at == LATER
    with pytest.raises(InvalidArgument, match="between 1 day and 36500 days"):
        lifecycle.rotation_schedule(key, MIN_ROTATION_PERIOD - timedelta(seconds=1), T0)
    with pytest.raises(InvalidArgument, match="whole seconds"):
        lifecycle.rotation_schedule(key, timedelta(days=1, microseconds=5), T0)
    sbv2 = make_key(ENABLED, purpose=KeyPurpose.SECURE_BOOT_V2)
    with pytest.raises(FailedPrecondition, match=r"Secure Boot V2 key.*eFuses"):
        lifecycle.rotation_schedule(sbv2, timedelta(days=30), T0)


def test_next_rotation_time_and_when_a_scheduled_rotation_is_due() -> None:
    schedule = RotationSchedule(timedelta(days=1), LATER)
    assert lifecycle.next_rotation_time(managed(ENABLED)) is None
    assert lifecycle.next_rotation_time(managed(ENABLED, rotation=schedule)) == LATER
    assert not lifecycle.scheduled_rotation_is_due(managed(ENABLED), LATER)
    assert not lifecycle.scheduled_rotation_is_due(managed(ENABLED, rotation=schedule), T0)
    assert lifecycle.scheduled_rotation_is_due(managed(ENABLED, rotation=schedule), LATER)
    # an officer disabled every version: the schedule does not bring the key back into service
    assert not lifecycle.scheduled_rotation_is_due(managed(DISABLED, rotation=schedule), LATER)


# --- any sequence of requests keeps the rules -------------------------------------------------------------

REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(["transition", "rotate", "set_primary"]),
        st.integers(1, 5),
        st.sampled_from(STATES),
        st.none() | st.integers(1, 5),
        st.integers(0, 3),  # days the clock advances first
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(REQUESTS, st.sampled_from([KeyPurpose.DIGEST_SIGNING, KeyPurpose.OTA_MANIFEST]))
def test_any_sequence_of_requests_keeps_a_valid_key(
    requests: list[tuple[str, int, KeyVersionState, int | None, int]], purpose: KeyPurpose
) -> None:
    key = managed(ENABLED, purpose=purpose)
    now = T0
    for index, (operation, number, target, new_primary, days) in enumerate(requests):
        now += timedelta(days=days)
        before = key
        try:
            if operation == "rotate":
                change = lifecycle.rotate(key, index.to_bytes(16, "big"), b"", ALICE, now)
            elif operation == "set_primary":
                change = lifecycle.set_primary(key, number, ALICE, now)
            else:
                change = lifecycle.transition(key, number, target, ALICE, now, new_primary=new_primary)
        except (FailedPrecondition, NotFound):
            continue
        key = applied(key, change)
        states = {v.version: v.state for v in key.key.versions}
        lifecycle.check_primary(states, key.key.primary_version)
        for old in before.key.versions:
            new = states[old.version]
            assert new is old.state or new in TRANSITIONS[old.state]
        for record in change.transitions:
            assert record.actor == ALICE and record.at == now
        if purpose is KeyPurpose.OTA_MANIFEST:
            assert key.key.primary_version >= before.key.primary_version, "a manifest key moved back"


@pytest.mark.parametrize("target", [DISABLED, SCHEDULED])
def test_a_manifest_key_primary_leaving_is_told_to_rotate_not_to_move_back(target: KeyVersionState) -> None:
    """The hint for a primary that cannot leave names only what the rules then accept."""
    key = managed(ENABLED, ENABLED, ENABLED, primary=3, purpose=MANIFEST)
    with pytest.raises(FailedPrecondition, match="moves forward only: rotate the key first") as refused:
        lifecycle.transition(key, 3, target, ALICE, T0)
    assert "(1, 2)" not in str(refused.value)
    # a left-behind primary (data from before the rule) is pointed to the newer enabled versions only
    behind = managed(ENABLED, ENABLED, ENABLED, primary=2, purpose=MANIFEST)
    with pytest.raises(FailedPrecondition, match=r"make another enabled version \(3\) primary first"):
        lifecycle.transition(behind, 2, target, ALICE, T0)
    # other keys keep the general hint
    with pytest.raises(FailedPrecondition, match=r"make another enabled version \(1, 2\) primary first"):
        lifecycle.transition(managed(ENABLED, ENABLED, ENABLED, primary=3), 3, target, ALICE, T0)
