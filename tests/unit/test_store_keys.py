"""SqliteKeyRepository on a real SQLite file: round trips, constraints, atomicity, no stale cache."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.domain.errors import AlreadyExists, InvalidArgument, NotFound
from kms.domain.keys import Algorithm, Key, KeyPurpose, KeyVersion, KeyVersionState
from kms.store.database import Database
from kms.store.keys import SqliteKeyRepository

PUBLIC_KEY_DER = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
)
_hsm_ids = itertools.count(1)
T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def version(key_id: str, number: int = 1, state: KeyVersionState = KeyVersionState.ENABLED) -> KeyVersion:
    return KeyVersion(
        key_id=key_id,
        version=number,
        algorithm=Algorithm.ECDSA_P256_SHA256,
        state=state,
        hsm_id=next(_hsm_ids).to_bytes(8, "big"),
        public_key_der=PUBLIC_KEY_DER,
        created_at=T0,
    )


def key(key_id: str, product: str = "thermostat", slot: int | None = 0, versions: int = 1) -> Key:
    return Key(
        key_id=key_id,
        product=product,
        purpose=KeyPurpose.DIGEST_SIGNING if slot is None else KeyPurpose.SECURE_BOOT_V2,
        algorithm=Algorithm.ECDSA_P256_SHA256,
        sbv2_slot=slot,
        primary_version=versions,
        versions=tuple(version(key_id, n) for n in range(1, versions + 1)),
        created_at=T0,
    )


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "kms.db")
    yield database
    database.close()


@pytest.fixture
def repo(db: Database) -> SqliteKeyRepository:
    return SqliteKeyRepository(db)


def test_a_key_round_trips_exactly(repo: SqliteKeyRepository) -> None:
    original = key("fw-root", versions=3)
    repo.add_key(original)
    assert repo.get_key("fw-root") == original
    assert repo.get_key("fw-root").version().public_key_der == PUBLIC_KEY_DER


def test_a_missing_key_is_not_found(repo: SqliteKeyRepository) -> None:
    with pytest.raises(NotFound, match="key keys/nope does not exist"):
        repo.get_key("nope")


def test_list_keys_all_or_per_product(repo: SqliteKeyRepository) -> None:
    repo.add_key(key("b-key", product="p1", slot=None))
    repo.add_key(key("a-key", product="p2", slot=None))
    repo.add_key(key("c-key", product="p1", slot=1))
    assert [k.key_id for k in repo.list_keys()] == ["b-key", "c-key", "a-key"]  # by product, then key id
    assert [k.key_id for k in repo.list_keys("p1")] == ["b-key", "c-key"]
    assert repo.list_keys("nothing") == []


def test_sbv2_keys_come_in_slot_order_without_other_keys(repo: SqliteKeyRepository) -> None:
    repo.add_key(key("slot-two", slot=2))
    repo.add_key(key("digest", slot=None))
    repo.add_key(key("slot-zero", slot=0))
    repo.add_key(key("other-product", product="other", slot=1))
    assert [k.key_id for k in repo.sbv2_keys("thermostat")] == ["slot-zero", "slot-two"]
    assert repo.sbv2_keys("nothing") == []


def test_a_key_id_is_unique(repo: SqliteKeyRepository) -> None:
    repo.add_key(key("fw-root"))
    with pytest.raises(AlreadyExists, match="key keys/fw-root already exists"):
        repo.add_key(key("fw-root", product="other", slot=None))


def test_one_sbv2_key_per_slot_and_product(repo: SqliteKeyRepository) -> None:
    repo.add_key(key("first", slot=1))
    with pytest.raises(
        AlreadyExists, match="'thermostat' already has a Secure Boot V2 key in slot 1: keys/first"
    ):
        repo.add_key(key("second", slot=1))
    repo.add_key(key("same-slot-elsewhere", product="other", slot=1))
    repo.add_key(key("digest-1", slot=None))
    repo.add_key(key("digest-2", slot=None))
    assert len(repo.list_keys()) == 4


def test_a_failed_add_key_writes_nothing(repo: SqliteKeyRepository) -> None:
    existing = key("existing")
    repo.add_key(existing)
    reused = Key(
        key_id="reuser",
        product="thermostat",
        purpose=KeyPurpose.DIGEST_SIGNING,
        algorithm=Algorithm.ECDSA_P256_SHA256,
        sbv2_slot=None,
        primary_version=2,
        versions=(version("reuser", 1), replace(version("reuser", 2), hsm_id=existing.versions[0].hsm_id)),
        created_at=T0,
    )
    with pytest.raises(
        AlreadyExists, match="HSM key pair of keys/reuser/versions/2 already backs keys/existing/versions/1"
    ):
        repo.add_key(reused)
    with pytest.raises(NotFound):
        repo.get_key("reuser")


def test_inconsistent_keys_are_refused(repo: SqliteKeyRepository) -> None:
    with pytest.raises(InvalidArgument, match="no version 5"):
        repo.add_key(replace(key("k"), primary_version=5))
    with pytest.raises(InvalidArgument, match="must belong to it"):
        repo.add_key(replace(key("k"), versions=(version("other"),)))


def test_add_version_with_and_without_primary(repo: SqliteKeyRepository) -> None:
    repo.add_key(key("fw-root"))
    repo.add_version("fw-root", version("fw-root", 2, KeyVersionState.DISABLED), make_primary=False)
    assert repo.get_key("fw-root").primary_version == 1
    repo.add_version("fw-root", version("fw-root", 3), make_primary=True)
    stored = repo.get_key("fw-root")
    assert stored.primary_version == 3
    assert [(v.version, v.state) for v in stored.versions] == [
        (1, KeyVersionState.ENABLED),
        (2, KeyVersionState.DISABLED),
        (3, KeyVersionState.ENABLED),
    ]


def test_add_version_errors(repo: SqliteKeyRepository) -> None:
    repo.add_key(key("fw-root"))
    with pytest.raises(NotFound, match="keys/ghost"):
        repo.add_version("ghost", version("ghost", 2), make_primary=True)
    with pytest.raises(AlreadyExists, match="keys/fw-root/versions/1 already exists"):
        repo.add_version("fw-root", version("fw-root", 1), make_primary=True)
    with pytest.raises(InvalidArgument, match="does not belong"):
        repo.add_version("fw-root", version("other", 2), make_primary=True)
    assert repo.get_key("fw-root").primary_version == 1


def test_changes_from_another_process_are_seen_at_once(tmp_path: Path, repo: SqliteKeyRepository) -> None:
    repo.add_key(key("fw-root"))
    assert repo.get_key("fw-root").primary_version == 1
    with Database.open(tmp_path / "kms.db") as other:  # e.g. the CLI, with its own connections
        SqliteKeyRepository(other).add_version("fw-root", version("fw-root", 2), make_primary=True)
    assert repo.get_key("fw-root").primary_version == 2
