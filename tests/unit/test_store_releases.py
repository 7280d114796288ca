"""SqliteReleaseRepository: round trips, idempotency, floors, atomicity, concurrency, image reads."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kms.domain.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from kms.domain.releases import Release, SignatureRecord
from kms.store.blobs import BlobStore
from kms.store.database import Database
from kms.store.releases import SqliteReleaseRepository

T0 = datetime(2024, 5, 1, 12, 0, 0, 654321, tzinfo=UTC)
KEY_VERSIONS = ("keys/fw-root/versions/1", "keys/fw-backup/versions/2")


def release_of(
    image: bytes, input_image: bytes = b"unsigned", secure_version: int = 1, product: str = "thermostat"
) -> Release:
    return Release(
        product=product,
        chip="esp32c3",
        version="1.2.3",
        secure_version=secure_version,
        project_name="thermostat-fw",
        input_sha256=hashlib.sha256(input_image).digest(),
        output_sha256=hashlib.sha256(image).digest(),
        output_size=len(image),
        key_versions=KEY_VERSIONS,
        signed_by="spiffe://ci.example/builder",
        created_at=T0,
    )


def records_for(release: Release) -> list[SignatureRecord]:
    return [
        SignatureRecord("spiffe://ci.example/builder", "sign-image", name, os.urandom(32), release.name, T0)
        for name in release.key_versions
    ]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database.open(tmp_path / "kms.db")
    yield database
    database.close()


@pytest.fixture
def blobs(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "releases")


@pytest.fixture
def repo(db: Database, blobs: BlobStore) -> SqliteReleaseRepository:
    return SqliteReleaseRepository(db, blobs)


def count(db: Database, table: str) -> int:
    conn = sqlite3.connect(db.path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - test helper
    finally:
        conn.close()


def test_record_then_get_and_find_round_trip_exactly(repo: SqliteReleaseRepository, db: Database) -> None:
    image = os.urandom(4096)
    release = release_of(image)
    assert repo.record(release, image, records_for(release)) == release
    assert repo.get(release.output_sha256) == release
    assert repo.get(release.output_sha256).created_at.microsecond == 654321
    assert repo.find("thermostat", release.input_sha256, KEY_VERSIONS) == release
    assert repo.find("thermostat", release.input_sha256, KEY_VERSIONS[::-1]) is None  # order matters
    assert repo.find("other", release.input_sha256, KEY_VERSIONS) is None
    assert count(db, "signatures") == 2


def test_the_key_use_records_are_stored_with_the_release(repo: SqliteReleaseRepository, db: Database) -> None:
    image = os.urandom(100)
    release = release_of(image)
    records = records_for(release)
    repo.record(release, image, records)
    conn = sqlite3.connect(db.path)
    rows = conn.execute(
        "SELECT caller, operation, key_version, digest, subject, created_at FROM signatures"
    ).fetchall()
    conn.close()
    assert rows == [
        (r.caller, r.operation, r.key_version, r.digest, release.name, "2024-05-01T12:00:00.654321Z")
        for r in records
    ]


def test_unknown_release_is_not_found(repo: SqliteReleaseRepository) -> None:
    with pytest.raises(NotFound, match="releases/" + "ab" * 32):
        repo.get(bytes.fromhex("ab" * 32))
    with pytest.raises(NotFound):
        repo.read_image(bytes(32))


def test_recording_the_same_input_again_returns_the_first_release(
    repo: SqliteReleaseRepository, db: Database, blobs: BlobStore
) -> None:
    first_image, second_image = os.urandom(1000), os.urandom(1000)  # signatures are randomized
    first = release_of(first_image)
    repo.record(first, first_image, records_for(first))
    second = release_of(second_image)
    assert repo.record(second, second_image, records_for(second)) == first
    assert count(db, "releases") == 1
    assert count(db, "signatures") == 2
    assert not blobs.exists(second.output_sha256)  # found before storing anything


def test_the_floor_is_the_highest_secure_version_per_product(repo: SqliteReleaseRepository) -> None:
    assert repo.secure_version_floor("thermostat") is None
    for n, secure_version in enumerate([1, 3, 5, 5]):
        image = os.urandom(64)
        release = release_of(image, input_image=bytes([n]), secure_version=secure_version)
        repo.record(release, image, [])
    assert repo.secure_version_floor("thermostat") == 5
    image = os.urandom(64)
    repo.record(release_of(image, product="doorbell", secure_version=2), image, [])
    assert repo.secure_version_floor("doorbell") == 2
    assert repo.secure_version_floor("thermostat") == 5


def test_record_below_the_floor_is_refused_inside_the_transaction(
    repo: SqliteReleaseRepository, db: Database
) -> None:
    """The floor is checked again under the write lock, so two concurrent signings cannot both pass."""
    image = os.urandom(64)
    repo.record(release_of(image, input_image=b"a", secure_version=5), image, [])
    lower = os.urandom(64)
    with pytest.raises(FailedPrecondition, match="floor 5"):
        repo.record(release_of(lower, input_image=b"b", secure_version=4), lower, [])
    assert count(db, "releases") == 1
    assert repo.secure_version_floor("thermostat") == 5


def test_a_failed_record_commits_nothing(repo: SqliteReleaseRepository, db: Database) -> None:
    image = os.urandom(64)
    release = release_of(image, secure_version=7)
    naive = replace(
        records_for(release)[0], created_at=datetime(2024, 1, 1)
    )  # refused inside the transaction
    with pytest.raises(InvalidArgument, match="time zone"):
        repo.record(release, image, [*records_for(release), naive])
    assert count(db, "releases") == count(db, "signatures") == count(db, "product_floors") == 0
    assert repo.secure_version_floor("thermostat") is None


def test_an_image_that_does_not_match_its_release_is_refused(repo: SqliteReleaseRepository) -> None:
    image = os.urandom(64)
    with pytest.raises(InvalidArgument, match="does not match"):
        repo.record(release_of(image), image + b"x", [])


def test_the_same_output_for_another_input_is_refused(repo: SqliteReleaseRepository) -> None:
    image = os.urandom(64)
    repo.record(release_of(image, input_image=b"one"), image, [])
    with pytest.raises(AlreadyExists, match="already recorded for another input"):
        repo.record(release_of(image, input_image=b"two"), image, [])


def test_read_image_whole_and_from_an_offset(repo: SqliteReleaseRepository) -> None:
    image = os.urandom(300_000)
    release = release_of(image)
    repo.record(release, image, [])
    assert repo.read_image(release.output_sha256) == image
    assert repo.read_image(release.output_sha256, 123_456) == image[123_456:]
    assert b"".join(repo.image_chunks(release.output_sha256, 10, chunk_size=4096)) == image[10:]


def test_a_corrupted_or_missing_image_is_data_loss(repo: SqliteReleaseRepository, blobs: BlobStore) -> None:
    image = os.urandom(1000)
    release = release_of(image)
    repo.record(release, image, [])
    hex_digest = release.output_sha256.hex()
    path = blobs.root / "sha256" / hex_digest[:2] / hex_digest[2:]
    path.chmod(0o644)
    path.write_bytes(image[:-1] + bytes([image[-1] ^ 1]))
    with pytest.raises(DataLoss, match="corrupted"):
        repo.read_image(release.output_sha256)
    path.unlink()
    with pytest.raises(DataLoss, match="missing"):
        repo.read_image(release.output_sha256)


def record_concurrently(repos: list[SqliteReleaseRepository]) -> list[Release]:
    """Each repository records the same input with its own (randomized) signed image, all at once."""
    barrier = threading.Barrier(len(repos))

    def record(repo: SqliteReleaseRepository) -> Release:
        image = os.urandom(2048)
        release = release_of(image)
        barrier.wait()
        return repo.record(release, image, records_for(release))

    with ThreadPoolExecutor(len(repos)) as pool:
        return list(pool.map(record, repos))


def test_concurrent_records_of_one_release_give_one_row(repo: SqliteReleaseRepository, db: Database) -> None:
    results = record_concurrently([repo] * 8)
    assert len(set(results)) == 1
    assert count(db, "releases") == 1
    assert count(db, "signatures") == 2  # the winner's key uses only
    assert repo.read_image(results[0].output_sha256)


def test_concurrent_records_from_separate_databases_give_one_row(
    tmp_path: Path, db: Database, blobs: BlobStore
) -> None:
    others = [Database.open(tmp_path / "kms.db") for _ in range(3)]  # as if from other processes
    try:
        results = record_concurrently([SqliteReleaseRepository(d, blobs) for d in [db, *others]])
    finally:
        for other in others:
            other.close()
    assert len(set(results)) == 1
    assert count(db, "releases") == 1


def test_a_release_signed_by_a_revoked_slots_key_is_not_recorded(
    repo: SqliteReleaseRepository, db: Database
) -> None:
    """The last guard behind the signing service's 1 s cache of revoked slots: the release transaction
    itself refuses a release carrying a block of a revoked slot's key, and writes nothing."""
    conn = sqlite3.connect(db.path)  # raw connection: no foreign keys, so no key rows are needed
    conn.execute(
        "INSERT INTO sbv2_slot_revocations VALUES ('thermostat', 1, 'fw-backup', '2024-05-01T12:00:00Z', "
        "'spiffe://kms.dev/security-officer/alice', 'r1')"
    )
    conn.commit()
    conn.close()
    image = os.urandom(4096)
    release = release_of(image)
    with pytest.raises(FailedPrecondition, match="slot of key fw-backup was revoked"):
        repo.record(release, image, records_for(release))
    assert count(db, "releases") == 0 and count(db, "signatures") == 0
    other_product = replace(release, product="lamp")
    assert repo.record(other_product, image, records_for(other_product)) == other_product
