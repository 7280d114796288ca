"""``SqliteKeyRepository``: keys and key versions in SQLite (tables created by migration 1).

Tables::

    keys          key_id PK, product, purpose, algorithm, sbv2_slot (0-2 or NULL), primary_version,
                  created_at; UNIQUE (product, sbv2_slot): one Secure Boot V2 key per slot and product
                  (NULL slots are distinct, so other keys never compete).
    key_versions  (key_id, version) PK, key_id REFERENCES keys, algorithm, state, hsm_id BLOB UNIQUE
                  (one HSM key pair backs one version), public_key_der BLOB, created_at.

Lifecycle (migration 3, "key lifecycle", for ``kms.domain.lifecycle``) adds::

    key_versions     + destroy_after (set while destroy-scheduled: when the destruction falls due),
                     + material_destroyed_at (set once the HSM material of a destroyed version is confirmed
                       gone; NULL on a destroyed version means "destroy it again": an attempt failed half-way)
    keys             + rotation_period_seconds, next_rotation_at (both NULL: rotation on demand only)
    key_transitions  id, (key_id, version) REFERENCES key_versions, event, from_state (NULL for "created"),
                     to_state, actor, at, destroy_after: every lifecycle event, append-only

A lifecycle change (``apply_change``) is one transaction that first compares every version's state and the
primary with those the change was computed from, so concurrent changes of one key cannot interleave. A
rotation of an OTA manifest key also writes the new version's rollover statement (``kms.store.rollovers``)
and the key-use record of its signature (``signatures``) in that transaction.

Enums are stored by their ``value`` (``Algorithm.value`` etc.), timestamps as ISO-8601 UTC text with
microseconds. Every write is one transaction that checks its constraints first (inside ``BEGIN
IMMEDIATE``, so the check cannot race another writer) and raises ``AlreadyExists``/``NotFound`` with a
message naming the key. Every read is one snapshot; nothing is cached, so another process's changes (the
CLI creating a key) are seen at once.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from kms.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from kms.domain.keys import Algorithm, Key, KeyName, KeyPurpose, KeyVersion, KeyVersionState
from kms.domain.lifecycle import (
    LifecycleChange,
    LifecycleEvent,
    ManagedKey,
    RotationSchedule,
    Transition,
)
from kms.store.database import Database, Row, Session, timestamp_text
from kms.store.rollovers import insert_rollover
from kms.store.signature_log import insert_signatures

# One query for every read; NULL parameters mean "any".
_KEYS = """
SELECT * FROM keys
WHERE (:key_id IS NULL OR key_id = :key_id)
  AND (:product IS NULL OR product = :product)
  AND (NOT :sbv2_only OR sbv2_slot IS NOT NULL)
ORDER BY product, key_id
"""
_VERSIONS = """
SELECT v.* FROM key_versions AS v JOIN keys AS k USING (key_id)
WHERE (:key_id IS NULL OR k.key_id = :key_id)
  AND (:product IS NULL OR k.product = :product)
  AND (NOT :sbv2_only OR k.sbv2_slot IS NOT NULL)
ORDER BY v.key_id, v.version
"""


def _version_from_row(row: Row) -> KeyVersion:
    return KeyVersion(
        key_id=row.text("key_id"),
        version=row.integer("version"),
        algorithm=row.enum("algorithm", Algorithm),
        state=row.enum("state", KeyVersionState),
        hsm_id=row.blob("hsm_id"),
        public_key_der=row.blob("public_key_der"),
        created_at=row.timestamp("created_at"),
    )


def _load(
    session: Session, key_id: str | None = None, product: str | None = None, sbv2_only: bool = False
) -> list[Key]:
    params: dict[str, object] = {"key_id": key_id, "product": product, "sbv2_only": sbv2_only}
    versions: defaultdict[str, list[KeyVersion]] = defaultdict(list)
    for row in session.rows(_VERSIONS, params):
        version = _version_from_row(row)
        versions[version.key_id].append(version)
    return [
        Key(
            key_id=row.text("key_id"),
            product=row.text("product"),
            purpose=row.enum("purpose", KeyPurpose),
            algorithm=row.enum("algorithm", Algorithm),
            sbv2_slot=row.optional_integer("sbv2_slot"),
            primary_version=row.integer("primary_version"),
            versions=tuple(versions[row.text("key_id")]),
            created_at=row.timestamp("created_at"),
        )
        for row in session.rows(_KEYS, params)
    ]


def _insert_version(session: Session, version: KeyVersion) -> None:
    if session.row(
        "SELECT 1 FROM key_versions WHERE key_id = ? AND version = ?", [version.key_id, version.version]
    ):
        raise AlreadyExists(f"key version {version.name} already exists")
    holder = session.row("SELECT key_id, version FROM key_versions WHERE hsm_id = ?", [version.hsm_id])
    if holder is not None:
        other = KeyName(holder.text("key_id"), holder.integer("version"))
        raise AlreadyExists(f"the HSM key pair of {version.name} already backs {other}")
    session.execute(
        "INSERT INTO key_versions (key_id, version, algorithm, state, hsm_id, public_key_der, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            version.key_id,
            version.version,
            version.algorithm.value,
            version.state.value,
            version.hsm_id,
            version.public_key_der,
            timestamp_text(version.created_at),
        ],
    )


class SqliteKeyRepository:
    """``kms.domain.ports.KeyRepository`` on a ``Database``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add_key(self, key: Key) -> None:
        if any(v.key_id != key.key_id for v in key.versions):
            raise InvalidArgument(f"every version of key {key.name} must belong to it")
        if key.primary_version not in {v.version for v in key.versions}:
            raise InvalidArgument(f"key {key.name} has no version {key.primary_version} to make primary")
        with self._db.transaction() as session:
            if session.row("SELECT 1 FROM keys WHERE key_id = ?", [key.key_id]):
                raise AlreadyExists(f"key {key.name} already exists")
            if key.sbv2_slot is not None:
                holder = session.row(
                    "SELECT key_id FROM keys WHERE product = ? AND sbv2_slot = ?",
                    [key.product, key.sbv2_slot],
                )
                if holder is not None:
                    raise AlreadyExists(
                        f"product {key.product!r} already has a Secure Boot V2 key in slot {key.sbv2_slot}: "
                        f"{KeyName(holder.text('key_id'))}"
                    )
            session.execute(
                "INSERT INTO keys (key_id, product, purpose, algorithm, sbv2_slot, primary_version, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    key.key_id,
                    key.product,
                    key.purpose.value,
                    key.algorithm.value,
                    key.sbv2_slot,
                    key.primary_version,
                    timestamp_text(key.created_at),
                ],
            )
            for version in key.versions:
                _insert_version(session, version)

    def get_key(self, key_id: str) -> Key:
        with self._db.snapshot() as session:
            keys = _load(session, key_id=key_id)
        if not keys:
            raise NotFound(f"key {KeyName(key_id)} does not exist")
        return keys[0]

    def list_keys(self, product: str | None = None) -> list[Key]:
        with self._db.snapshot() as session:
            return _load(session, product=product)

    def sbv2_keys(self, product: str) -> list[Key]:
        with self._db.snapshot() as session:
            keys = _load(session, product=product, sbv2_only=True)
        return sorted(keys, key=lambda k: k.sbv2_slot or 0)

    def add_version(self, key_id: str, version: KeyVersion, make_primary: bool) -> None:
        if version.key_id != key_id:
            raise InvalidArgument(f"key version {version.name} does not belong to key {KeyName(key_id)}")
        with self._db.transaction() as session:
            if session.row("SELECT 1 FROM keys WHERE key_id = ?", [key_id]) is None:
                raise NotFound(f"key {KeyName(key_id)} does not exist")
            _insert_version(session, version)
            if make_primary:
                session.execute(
                    "UPDATE keys SET primary_version = ? WHERE key_id = ?", [version.version, key_id]
                )

    # -- lifecycle -------------------------------------------------------------------------------------

    def get_managed_key(self, key_id: str) -> ManagedKey:
        with self._db.snapshot() as session:
            keys = _load(session, key_id=key_id)
            if not keys:
                raise NotFound(f"key {KeyName(key_id)} does not exist")
            due = session.rows(
                "SELECT version, destroy_after FROM key_versions WHERE key_id = ? AND state = ?",
                [key_id, KeyVersionState.DESTROY_SCHEDULED.value],
            )
            rotation = session.row(
                "SELECT rotation_period_seconds, next_rotation_at FROM keys WHERE key_id = ?", [key_id]
            )
        assert rotation is not None
        return ManagedKey(
            keys[0],
            {row.integer("version"): row.timestamp("destroy_after") for row in due},
            _rotation_from_row(rotation),
        )

    def apply_change(self, change: LifecycleChange) -> None:
        with self._db.transaction() as session:
            _check_based_on(session, change)
            if change.new_version is not None:
                if change.new_version.key_id != change.key_id:
                    raise InvalidArgument(
                        f"{change.new_version.name} does not belong to {KeyName(change.key_id)}"
                    )
                _insert_version(session, change.new_version)
            for update in change.updates:
                session.execute(
                    "UPDATE key_versions SET state = ?, destroy_after = ? WHERE key_id = ? AND version = ?",
                    [
                        update.state.value,
                        _optional_timestamp(update.destroy_after),
                        change.key_id,
                        update.version,
                    ],
                )
            session.execute(
                "UPDATE keys SET primary_version = ? WHERE key_id = ?", [change.primary, change.key_id]
            )
            if change.next_rotation_at is not None:
                session.execute(
                    "UPDATE keys SET next_rotation_at = ? "
                    "WHERE key_id = ? AND rotation_period_seconds IS NOT NULL",
                    [timestamp_text(change.next_rotation_at), change.key_id],
                )
            for record in change.transitions:
                _insert_transition(session, record)
            if change.rollover is not None:
                new, introduced = change.new_version, change.rollover
                if new is None or (new.key_id, new.version) != (introduced.key_id, introduced.to_version):
                    raise InvalidArgument("a rollover statement is stored with the version it introduces")
                insert_rollover(session, change.rollover)
            insert_signatures(session, change.key_uses)

    def record_material_destroyed(self, key_id: str, version: int, at: datetime) -> None:
        name = KeyName(key_id, version)
        with self._db.transaction() as session:
            row = session.row(
                "SELECT state FROM key_versions WHERE key_id = ? AND version = ?", [key_id, version]
            )
            if row is None:
                raise NotFound(f"key version {name} does not exist")
            if row.enum("state", KeyVersionState) is not KeyVersionState.DESTROYED:
                raise FailedPrecondition(f"key version {name} is not destroyed")
            session.execute(
                "UPDATE key_versions SET material_destroyed_at = coalesce(material_destroyed_at, ?) "
                "WHERE key_id = ? AND version = ?",
                [timestamp_text(at), key_id, version],
            )

    def due_for_destruction(self, now: datetime) -> list[KeyVersion]:
        with self._db.snapshot() as session:
            rows = session.rows(_DUE_FOR_DESTRUCTION, {"now": timestamp_text(now)})
        return [_version_from_row(row) for row in rows]

    def due_for_rotation(self, now: datetime) -> list[str]:
        with self._db.snapshot() as session:
            rows = session.rows(
                "SELECT key_id FROM keys WHERE next_rotation_at <= ? ORDER BY next_rotation_at, key_id",
                [timestamp_text(now)],
            )
        return [row.text("key_id") for row in rows]

    def set_rotation_schedule(self, key_id: str, schedule: RotationSchedule | None) -> None:
        seconds = None if schedule is None else int(schedule.period.total_seconds())
        next_at = None if schedule is None else timestamp_text(schedule.next_rotation_at)
        with self._db.transaction() as session:
            changed = session.execute(
                "UPDATE keys SET rotation_period_seconds = ?, next_rotation_at = ? WHERE key_id = ?",
                [seconds, next_at, key_id],
            )
            if not changed:
                raise NotFound(f"key {KeyName(key_id)} does not exist")

    def record_transition(self, transition: Transition) -> None:
        with self._db.transaction() as session:
            _insert_transition(session, transition)

    def list_transitions(self, key_id: str, version: int | None = None) -> list[Transition]:
        with self._db.snapshot() as session:
            if session.row("SELECT 1 FROM keys WHERE key_id = ?", [key_id]) is None:
                raise NotFound(f"key {KeyName(key_id)} does not exist")
            rows = session.rows(_TRANSITIONS, {"key_id": key_id, "version": version})
        return [_transition_from_row(row) for row in rows]


_TRANSITIONS = """
SELECT key_id, version, event, coalesce(from_state, '') AS from_state, to_state, actor, at,
       coalesce(destroy_after, '') AS destroy_after
FROM key_transitions
WHERE key_id = :key_id AND (:version IS NULL OR version = :version)
ORDER BY id
"""
_DUE_FOR_DESTRUCTION = """
SELECT * FROM key_versions
WHERE (state = 'destroy-scheduled' AND destroy_after <= :now)
   OR (state = 'destroyed' AND material_destroyed_at IS NULL)
ORDER BY destroy_after, key_id, version
"""


def _optional_timestamp(moment: datetime | None) -> str | None:
    return None if moment is None else timestamp_text(moment)


def _rotation_from_row(row: Row) -> RotationSchedule | None:
    seconds = row.optional_integer("rotation_period_seconds")
    if seconds is None:
        return None
    return RotationSchedule(timedelta(seconds=seconds), row.timestamp("next_rotation_at"))


def _check_based_on(session: Session, change: LifecycleChange) -> None:
    name = KeyName(change.key_id)
    row = session.row("SELECT primary_version FROM keys WHERE key_id = ?", [change.key_id])
    if row is None:
        raise NotFound(f"key {name} does not exist")
    stored = {
        r.integer("version"): r.enum("state", KeyVersionState)
        for r in session.rows("SELECT version, state FROM key_versions WHERE key_id = ?", [change.key_id])
    }
    if row.integer("primary_version") != change.based_on_primary or stored != dict(change.based_on):
        raise FailedPrecondition(
            f"key {name} was changed by another request meanwhile; read it again and retry"
        )


def _insert_transition(session: Session, record: Transition) -> None:
    if (
        session.row(
            "SELECT 1 FROM key_versions WHERE key_id = ? AND version = ?", [record.key_id, record.version]
        )
        is None
    ):
        raise NotFound(f"key version {record.name} does not exist")
    session.execute(
        "INSERT INTO key_transitions "
        "(key_id, version, event, from_state, to_state, actor, at, destroy_after) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            record.key_id,
            record.version,
            record.event.value,
            None if record.from_state is None else record.from_state.value,
            record.to_state.value,
            record.actor,
            timestamp_text(record.at),
            _optional_timestamp(record.destroy_after),
        ],
    )


def _transition_from_row(row: Row) -> Transition:
    """A row of ``_TRANSITIONS`` (NULL ``from_state`` and ``destroy_after`` read as empty text)."""
    return Transition(
        key_id=row.text("key_id"),
        version=row.integer("version"),
        event=row.enum("event", LifecycleEvent),
        from_state=row.enum("from_state", KeyVersionState) if row.text("from_state") else None,
        to_state=row.enum("to_state", KeyVersionState),
        actor=row.text("actor"),
        at=row.timestamp("at"),
        destroy_after=row.timestamp("destroy_after") if row.text("destroy_after") else None,
    )
