"""SqliteKeyRepository's lifecycle part on a real SQLite file: migration, atomic changes, records, due."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kms.domain import lifecycle
from kms.domain.errors import AlreadyExists, FailedPrecondition, NotFound
from kms.domain.keys import Algorithm, Key, KeyPurpose, KeyVersion, KeyVersionState
from kms.domain.lifecycle import LifecycleEvent, ManagedKey, RotationSchedule, Transition
from kms.store.database import MIGRATIONS, Database
from kms.store.keys import SqliteKeyRepository

ENABLED = KeyVersionState.ENABLED
DISABLED = KeyVersionState.DISABLED
SCHEDULED = KeyVersionState.DESTROY_SCHEDULED
DESTROYED = KeyVersionState.DESTROYED

T0 = datetime(2025, 3, 1, 9, 0, 0, 250000, tzinfo=UTC)
ALICE = "spiffe://kms.example/security-officer/alice"
BOB = "spiffe://kms.example/security-officer/bob"
_hsm_ids = itertools.count(1)


def version(key_id: str, number: int, state: KeyVersionState = ENABLED) -> KeyVersion:
    hsm_id = next(_hsm_ids).to_bytes(16, "big")
    return KeyVersion(key_id, number, Algorithm.HMAC_SHA256, state, hsm_id, b"", T0)


def key(key_id: str = "seed", versions: int = 1) -> Key:
    return Key(
        key_id,
        "thermostat",
        KeyPurpose.PAYLOAD_SEED,
        Algorithm.HMAC_SHA256,
        None,
        1,
        tuple(version(key_id, n) for n in range(1, versions + 1)),
        T0,
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "kms.db"


@pytest.fixture
def repo(path: Path) -> Iterator[SqliteKeyRepository]:
    with Database.open(path) as db:
        yield SqliteKeyRepository(db)


def raw(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_the_migration_adds_columns_to_existing_keys(path: Path) -> None:
    index = next(i for i, m in enumerate(MIGRATIONS) if m.description.startswith("key lifecycle"))
    original = key()
    with Database.open(path, migrations=MIGRATIONS[:index]) as db:  # as the previous release left it
        SqliteKeyRepository(db).add_key(original)
    with Database.open(path) as db:
        assert db.schema_version == len(MIGRATIONS)
        repo = SqliteKeyRepository(db)
        assert repo.get_managed_key("seed") == ManagedKey(original, {}, None)
        assert repo.list_transitions("seed") == []
    columns = {str(r[1]) for r in raw(path, "PRAGMA table_info(key_versions)")}
    assert {"destroy_after", "material_destroyed_at"} <= columns
    columns = {str(r[1]) for r in raw(path, "PRAGMA table_info(keys)")}
    assert {"rotation_period_seconds", "next_rotation_at"} <= columns


def test_a_change_and_its_records_are_stored_together(repo: SqliteKeyRepository) -> None:
    repo.add_key(key(versions=2))
    repo.apply_change(lifecycle.creation(repo.get_key("seed"), ALICE))
    managed = repo.get_managed_key("seed")
    change = lifecycle.schedule_destroy(managed, 1, BOB, T0, new_primary=2)
    repo.apply_change(change)

    after = repo.get_managed_key("seed")
    assert after.key.primary_version == 2
    assert after.version(1).state is SCHEDULED
    assert after.destroy_after == {1: T0 + timedelta(hours=24)}
    records = repo.list_transitions("seed")
    assert [(r.version, r.event) for r in records] == [
        (1, LifecycleEvent.CREATED),
        (2, LifecycleEvent.CREATED),
        (1, LifecycleEvent.MADE_PRIMARY),
        (1, LifecycleEvent.DESTROY_SCHEDULED),
        (2, LifecycleEvent.MADE_PRIMARY),
    ]
    assert records[3] == Transition(
        "seed", 1, LifecycleEvent.DESTROY_SCHEDULED, ENABLED, SCHEDULED, BOB, T0, T0 + timedelta(hours=24)
    )
    assert repo.list_transitions("seed", 2) == [records[1], records[4]]

    cancel = lifecycle.cancel_destroy(after, 1, ALICE, T0 + timedelta(hours=1))
    repo.apply_change(cancel)
    cancelled = repo.get_managed_key("seed")
    assert cancelled.version(1).state is DISABLED and cancelled.destroy_after == {}
    assert repo.list_transitions("seed", 1)[-1].event is LifecycleEvent.DESTROY_CANCELLED


def test_a_change_based_on_a_stale_read_writes_nothing(repo: SqliteKeyRepository) -> None:
    repo.add_key(key(versions=2))
    stale = repo.get_managed_key("seed")
    repo.apply_change(lifecycle.transition(stale, 2, DISABLED, ALICE, T0))
    with pytest.raises(FailedPrecondition, match="keys/seed was changed by another request meanwhile"):
        repo.apply_change(lifecycle.transition(stale, 1, DISABLED, BOB, T0, new_primary=2))
    after = repo.get_managed_key("seed")
    assert [v.state for v in after.key.versions] == [ENABLED, DISABLED]
    assert [r.actor for r in repo.list_transitions("seed")] == [ALICE]

    # a change computed for another primary than the stored one is refused too
    other_primary = ManagedKey(replace(repo.get_key("seed"), primary_version=2))
    with pytest.raises(FailedPrecondition, match="changed by another request"):
        repo.apply_change(lifecycle.transition(other_primary, 2, ENABLED, BOB, T0))
    assert repo.get_key("seed").primary_version == 1


def test_rotation_inserts_the_version_and_moves_the_schedule(repo: SqliteKeyRepository) -> None:
    repo.add_key(key())
    schedule = RotationSchedule(timedelta(days=30), T0)
    repo.set_rotation_schedule("seed", schedule)
    managed = repo.get_managed_key("seed")
    assert managed.rotation == schedule
    assert repo.due_for_rotation(T0 - timedelta(seconds=1)) == []
    assert repo.due_for_rotation(T0) == ["seed"]

    change = lifecycle.rotate(managed, b"\x42" * 16, b"", "kms:scheduler", T0)
    repo.apply_change(change)
    after = repo.get_managed_key("seed")
    assert after.key.primary_version == 2 and after.key.version(2) == change.new_version
    assert after.rotation == RotationSchedule(timedelta(days=30), T0 + timedelta(days=30))
    assert repo.due_for_rotation(T0 + timedelta(days=29)) == []

    repo.set_rotation_schedule("seed", None)
    assert repo.get_managed_key("seed").rotation is None
    assert repo.due_for_rotation(T0 + timedelta(days=365)) == []
    with pytest.raises(NotFound, match="keys/ghost"):
        repo.set_rotation_schedule("ghost", schedule)


def test_a_rotation_reusing_hsm_material_or_a_number_is_refused(repo: SqliteKeyRepository) -> None:
    repo.add_key(key())
    managed = repo.get_managed_key("seed")
    taken = managed.key.version(1).hsm_id
    with pytest.raises(AlreadyExists, match="already backs keys/seed/versions/1"):
        repo.apply_change(lifecycle.rotate(managed, taken, b"", ALICE, T0))
    assert len(repo.get_key("seed").versions) == 1
    assert repo.list_transitions("seed") == []


def test_due_for_destruction_until_the_material_is_confirmed_gone(
    repo: SqliteKeyRepository, path: Path
) -> None:
    repo.add_key(key(versions=3))
    managed = repo.get_managed_key("seed")
    repo.apply_change(lifecycle.schedule_destroy(managed, 2, ALICE, T0))
    managed = repo.get_managed_key("seed")
    repo.apply_change(lifecycle.schedule_destroy(managed, 3, ALICE, T0 + timedelta(hours=1)))
    due = T0 + timedelta(hours=24)

    assert repo.due_for_destruction(due - timedelta(microseconds=1)) == []
    assert [v.version for v in repo.due_for_destruction(due)] == [2]
    assert [v.version for v in repo.due_for_destruction(due + timedelta(hours=1))] == [2, 3]

    with pytest.raises(FailedPrecondition, match="keys/seed/versions/2 is not destroyed"):
        repo.record_material_destroyed("seed", 2, due)
    managed = repo.get_managed_key("seed")
    repo.apply_change(lifecycle.transition(managed, 2, DESTROYED, "kms:scheduler", due))
    # recorded DESTROYED, material not yet confirmed gone: still due (a crash here is finished next run)
    pending = repo.due_for_destruction(due)
    assert [(v.version, v.state) for v in pending] == [(2, DESTROYED)]
    repo.record_material_destroyed("seed", 2, due)
    repo.record_material_destroyed("seed", 2, due + timedelta(hours=5))  # idempotent, keeps the first
    assert repo.due_for_destruction(due) == []
    assert raw(path, "SELECT material_destroyed_at FROM key_versions WHERE version = 2") == [
        ("2025-03-02T09:00:00.250000Z",)
    ]
    with pytest.raises(NotFound, match="keys/seed/versions/9"):
        repo.record_material_destroyed("seed", 9, due)


def test_records_need_an_existing_version(repo: SqliteKeyRepository) -> None:
    repo.add_key(key())
    record = Transition("seed", 1, LifecycleEvent.DISABLED, ENABLED, DISABLED, ALICE, T0)
    repo.record_transition(record)
    assert repo.list_transitions("seed") == [record]
    with pytest.raises(NotFound, match="keys/seed/versions/2 does not exist"):
        repo.record_transition(replace(record, version=2))
    with pytest.raises(NotFound, match="keys/ghost does not exist"):
        repo.list_transitions("ghost")
    with pytest.raises(NotFound, match="keys/ghost does not exist"):
        repo.get_managed_key("ghost")


def test_changes_of_a_missing_key_are_not_found(repo: SqliteKeyRepository) -> None:
    ghost = ManagedKey(key("ghost"))
    with pytest.raises(NotFound, match="keys/ghost does not exist"):
        repo.apply_change(lifecycle.transition(ghost, 1, DISABLED, ALICE, T0))
