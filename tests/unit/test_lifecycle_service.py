"""KeyLifecycle with a fake HSM and a real SQLite file: material handling, failures half-way, scheduled work.

The same use case against SoftHSM2 is exercised by tests/integration/test_lifecycle_state_machine.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kms.domain.errors import FailedPrecondition, HsmUnavailable, InvalidArgument, KmsError
from kms.domain.identity import Caller, Role
from kms.domain.keys import Algorithm, KeyPurpose, KeyVersion, KeyVersionState
from kms.domain.lifecycle import LifecycleChange, LifecycleEvent
from kms.domain.ports import GeneratedKeyPair, ImportedSecret, TransportBatch
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import SCHEDULER, KeyLifecycle, require_enabled
from kms.store.database import Database
from kms.store.keys import SqliteKeyRepository

ENABLED = KeyVersionState.ENABLED
DISABLED = KeyVersionState.DISABLED
SCHEDULED = KeyVersionState.DESTROY_SCHEDULED
DESTROYED = KeyVersionState.DESTROYED
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
OFFICER = Caller("spiffe://kms.example/security-officer/alice", Role.SECURITY_OFFICER)


class FakeHsm:
    """Only what the lifecycle uses: generation and destruction, with the ids of the material it holds."""

    def __init__(self) -> None:
        self.held: dict[bytes, str] = {}  # hsm_id -> label
        self.fail_destroy = False

    def generate_key_pair(self, algorithm: Algorithm, label: str) -> GeneratedKeyPair:
        hsm_id = secrets.token_bytes(16)
        self.held[hsm_id] = f"pair {label}"
        return GeneratedKeyPair(hsm_id, b"public " + hsm_id)

    def generate_secret_key(self, algorithm: Algorithm, label: str) -> bytes:
        hsm_id = secrets.token_bytes(16)
        self.held[hsm_id] = f"secret {label}"
        return hsm_id

    def destroy_key_pair(self, hsm_id: bytes) -> None:
        if self.fail_destroy:
            raise HsmUnavailable("the HSM cannot be reached")
        self.held.pop(hsm_id, None)

    def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        raise NotImplementedError

    def import_secrets(
        self,
        kek_hsm_id: bytes,
        secrets: Sequence[bytes],
        *,
        transport: TransportBatch | None,
        fingerprint_message: bytes,
    ) -> list[ImportedSecret | KmsError]:
        raise NotImplementedError

    def hmac_with_wrapped_secret(self, kek_hsm_id: bytes, wrapped: bytes, message: bytes) -> bytes:
        raise NotImplementedError

    def rewrap_secrets(
        self, old_kek_hsm_id: bytes, new_kek_hsm_id: bytes, blobs: Sequence[bytes]
    ) -> list[bytes | KmsError]:
        raise NotImplementedError

    def hmac(self, hsm_id: bytes, message: bytes) -> bytes:
        raise NotImplementedError

    def is_available(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def hsm() -> FakeHsm:
    return FakeHsm()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database.open(tmp_path / "kms.db") as database:
        yield database


@pytest.fixture
def repo(db: Database) -> SqliteKeyRepository:
    return SqliteKeyRepository(db)


@pytest.fixture
def changed() -> list[str]:
    return []


@pytest.fixture
def service(hsm: FakeHsm, repo: SqliteKeyRepository, clock: Clock, changed: list[str]) -> KeyLifecycle:
    return KeyLifecycle(hsm, repo, clock=clock, changed=changed.append)


def create(
    hsm: FakeHsm,
    repo: SqliteKeyRepository,
    clock: Clock,
    key_id: str,
    purpose: KeyPurpose = KeyPurpose.DIGEST_SIGNING,
    algorithm: Algorithm = Algorithm.ECDSA_P256_SHA256,
) -> None:
    key = KeyAdministration(hsm, repo, clock).create_key(key_id, "thermostat", purpose, algorithm, None)
    KeyLifecycle(hsm, repo, clock=clock).record_creation(OFFICER, key)


def test_rotation_generates_material_of_the_right_kind(
    service: KeyLifecycle, hsm: FakeHsm, repo: SqliteKeyRepository, clock: Clock, changed: list[str]
) -> None:
    create(hsm, repo, clock, "fw")
    create(hsm, repo, clock, "kek", KeyPurpose.KEY_ENCRYPTION, Algorithm.AES_256)
    v2 = service.rotate(OFFICER, "fw")
    k2 = service.rotate(OFFICER, "kek")
    assert hsm.held[v2.hsm_id] == "pair fw/2" and v2.public_key_der == b"public " + v2.hsm_id
    assert hsm.held[k2.hsm_id] == "secret kek/2" and k2.public_key_der == b""
    assert service.get("fw").key.primary_version == 2
    assert changed == ["fw", "kek"]
    records = service.transitions("keys/fw")
    assert [(r.version, r.event, r.actor) for r in records] == [
        (1, LifecycleEvent.CREATED, OFFICER.identity),
        (1, LifecycleEvent.MADE_PRIMARY, OFFICER.identity),
        (2, LifecycleEvent.CREATED, OFFICER.identity),
        (2, LifecycleEvent.MADE_PRIMARY, OFFICER.identity),
    ]


def test_a_rotation_that_cannot_be_stored_leaves_no_material(
    hsm: FakeHsm, db: Database, repo: SqliteKeyRepository, clock: Clock
) -> None:
    create(hsm, repo, clock, "fw")

    class Racing(SqliteKeyRepository):
        def apply_change(self, change: LifecycleChange) -> None:
            raise FailedPrecondition("key keys/fw was changed by another request meanwhile")

    held = set(hsm.held)
    with pytest.raises(FailedPrecondition, match="changed by another request"):
        KeyLifecycle(hsm, Racing(db), clock=clock).rotate(OFFICER, "fw")
    assert set(hsm.held) == held


def test_destruction_runs_when_due_and_only_then(
    service: KeyLifecycle, hsm: FakeHsm, repo: SqliteKeyRepository, clock: Clock
) -> None:
    create(hsm, repo, clock, "fw")
    v2 = service.rotate(OFFICER, "fw")
    v1 = service.get("fw").key.version(1)
    service.schedule_destroy(OFFICER, v1.name, delay=timedelta(hours=2))
    assert service.destroy_due(T0 + timedelta(hours=1)).done == ()
    with pytest.raises(FailedPrecondition, match="scheduled for destruction at"):
        service.set_state(OFFICER, v1.name, DESTROYED)
    assert v1.hsm_id in hsm.held

    result = service.destroy_due(T0 + timedelta(hours=2))
    assert result.done == ("keys/fw/versions/1",) and result.failed == ()
    assert v1.hsm_id not in hsm.held and v2.hsm_id in hsm.held
    assert service.get("fw").version(1).state is DESTROYED
    last = service.transitions(v1.name)[-1]
    assert (last.event, last.from_state, last.to_state, last.actor) == (
        LifecycleEvent.DESTROYED,
        SCHEDULED,
        DESTROYED,
        SCHEDULER,
    )


def test_an_hsm_failure_half_way_is_finished_by_the_next_run(
    service: KeyLifecycle, hsm: FakeHsm, repo: SqliteKeyRepository, clock: Clock
) -> None:
    create(hsm, repo, clock, "fw")
    service.rotate(OFFICER, "fw")
    v1 = service.get("fw").key.version(1)
    service.schedule_destroy(OFFICER, v1.name)
    due = T0 + timedelta(hours=24)
    hsm.fail_destroy = True
    result = service.destroy_due(due)
    assert [(name, type(e)) for name, e in result.failed] == [("keys/fw/versions/1", HsmUnavailable)]
    assert service.get("fw").version(1).state is DESTROYED  # never usable again, even if still held
    with pytest.raises(FailedPrecondition, match="is destroyed; only a version scheduled"):
        service.cancel_destroy(OFFICER, v1.name)
    hsm.fail_destroy = False
    assert service.destroy_due(due + timedelta(minutes=1)).done == ("keys/fw/versions/1",)
    assert v1.hsm_id not in hsm.held
    assert service.destroy_due(due + timedelta(minutes=2)).done == ()


def test_a_destruction_cancelled_after_the_sweep_read_it_is_skipped(
    hsm: FakeHsm, db: Database, repo: SqliteKeyRepository, clock: Clock
) -> None:
    create(hsm, repo, clock, "fw")
    service = KeyLifecycle(hsm, repo, clock=clock)
    service.rotate(OFFICER, "fw")
    v1 = service.get("fw").key.version(1)
    service.schedule_destroy(OFFICER, v1.name)
    due = T0 + timedelta(hours=24)

    class CancelsWhileSweeping(SqliteKeyRepository):
        def due_for_destruction(self, now: datetime) -> list[KeyVersion]:
            found = super().due_for_destruction(now)
            service.cancel_destroy(OFFICER, v1.name)
            return found

    sweeping = KeyLifecycle(hsm, CancelsWhileSweeping(db), clock=clock)
    assert sweeping.destroy_due(due).done == ()
    assert service.get("fw").version(1).state is DISABLED and v1.hsm_id in hsm.held


def test_scheduled_rotation(
    service: KeyLifecycle, hsm: FakeHsm, repo: SqliteKeyRepository, clock: Clock
) -> None:
    create(hsm, repo, clock, "seed", KeyPurpose.PAYLOAD_SEED, Algorithm.HMAC_SHA256)
    create(hsm, repo, clock, "off", KeyPurpose.KEY_ENCRYPTION, Algorithm.AES_256)
    service.set_rotation_schedule(OFFICER, "seed", timedelta(days=30))
    service.set_rotation_schedule(OFFICER, "off", timedelta(days=30))
    service.set_state(OFFICER, "keys/off/versions/1", DISABLED)  # no enabled version: not rotated

    assert service.rotate_due(T0 + timedelta(days=29)).done == ()
    result = service.rotate_due(T0 + timedelta(days=30))
    assert result.done == ("keys/seed/versions/2",) and result.failed == ()
    seed = service.get("seed")
    assert seed.key.primary_version == 2
    assert seed.rotation is not None and seed.rotation.next_rotation_at == T0 + timedelta(days=60)
    assert service.transitions("keys/seed/versions/2")[0].actor == SCHEDULER
    assert len(service.get("off").key.versions) == 1

    clock.now = T0 + timedelta(days=45)  # an on-demand rotation moves the schedule too
    service.rotate(OFFICER, "seed")
    rotation = service.get("seed").rotation
    assert rotation is not None and rotation.next_rotation_at == T0 + timedelta(days=75)
    service.set_rotation_schedule(OFFICER, "seed", None)
    assert service.get("seed").rotation is None


def test_requests_name_versions_and_the_delay_is_checked(
    service: KeyLifecycle, hsm: FakeHsm, repo: SqliteKeyRepository, clock: Clock
) -> None:
    create(hsm, repo, clock, "fw")
    with pytest.raises(InvalidArgument, match="names a key; a key version is needed"):
        service.set_state(OFFICER, "keys/fw", DISABLED)
    with pytest.raises(InvalidArgument, match="malformed key name"):
        service.cancel_destroy(OFFICER, "fw/1")
    with pytest.raises(InvalidArgument, match="destruction delay"):
        KeyLifecycle(hsm, repo, destroy_delay=timedelta(minutes=5))
    with pytest.raises(InvalidArgument, match="destruction delay"):
        service.schedule_destroy(OFFICER, "keys/fw/versions/1", delay=timedelta(0))


def test_require_enabled(
    service: KeyLifecycle, hsm: FakeHsm, repo: SqliteKeyRepository, clock: Clock
) -> None:
    create(hsm, repo, clock, "fw")
    version = service.get("fw").key.version(1)
    assert require_enabled(version) is version
    service.set_state(OFFICER, version.name, DISABLED)
    with pytest.raises(
        FailedPrecondition, match="keys/fw/versions/1 is disabled; only enabled versions sign, wrap or unwrap"
    ):
        require_enabled(service.get("fw").key.version(1))
