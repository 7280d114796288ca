"""Anti-rollback floors: the lowering rules (``kms.domain.releases``), the store's atomic lowering against
a real SQLite file (``kms.store.releases``), and the product scope of ``RollbackFloors``."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kms.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from kms.domain.identity import Caller, Role
from kms.domain.keys import Algorithm, KeyPurpose
from kms.domain.releases import (
    FloorLowering,
    Release,
    SignatureRecord,
    check_floor,
    check_floor_unmoved,
    check_lowering,
)
from kms.service.keys import KeyAdministration
from kms.service.rollback import RollbackFloors
from kms.store.blobs import BlobStore
from kms.store.database import Database
from kms.store.keys import SqliteKeyRepository
from kms.store.releases import SqliteReleaseRepository
from tests.support.fake_admin import SoftwareHsm

T0 = datetime(2026, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
PRODUCT = "thermostat"
ALICE = Caller("spiffe://kms.dev/security-officer/alice", Role.SECURITY_OFFICER)


def _lowering(from_: int, to: int, product: str = PRODUCT) -> FloorLowering:
    return FloorLowering(product, from_, to, ALICE.identity, "0123abcd", T0)


# -- the rules -------------------------------------------------------------------------------------------


def test_lowering_needs_a_floor_and_a_lower_value() -> None:
    assert check_lowering(PRODUCT, 5, 2) == 5
    assert check_lowering(PRODUCT, 5, 0) == 5
    with pytest.raises(FailedPrecondition, match="no anti-rollback floor to lower: nothing was signed"):
        check_lowering(PRODUCT, None, 0)
    for same_or_higher in (5, 6):
        with pytest.raises(
            InvalidArgument, match="must be below the current floor 5 of product 'thermostat'"
        ):
            check_lowering(PRODUCT, 5, same_or_higher)
    with pytest.raises(InvalidArgument, match="out of range"):
        check_lowering(PRODUCT, 5, -1)


def test_execution_is_refused_when_the_floor_moved_since_the_request() -> None:
    check_floor_unmoved(_lowering(5, 2), 5)
    with pytest.raises(FailedPrecondition, match="is now at 7, not at 5 as when the lowering was requested"):
        check_floor_unmoved(_lowering(5, 2), 7)
    with pytest.raises(FailedPrecondition, match="is now at 3, not at 5"):
        check_floor_unmoved(_lowering(5, 2), 3)  # lowered by another request meanwhile
    with pytest.raises(FailedPrecondition, match="has no floor"):
        check_floor_unmoved(_lowering(5, 2), None)


def test_signing_checks_against_the_floor_as_it_is() -> None:
    check_floor(PRODUCT, 2, 2)
    with pytest.raises(FailedPrecondition, match="below the floor 2 of product 'thermostat'"):
        check_floor(PRODUCT, 1, 2)


# -- the store -------------------------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database.open(tmp_path / "kms.db") as database:
        yield database


@pytest.fixture
def repo(db: Database, tmp_path: Path) -> SqliteReleaseRepository:
    return SqliteReleaseRepository(db, BlobStore(tmp_path / "releases"))


def _sign(repo: SqliteReleaseRepository, secure_version: int, product: str = PRODUCT) -> Release:
    image = os.urandom(512)
    release = Release(
        product=product,
        chip="esp32c3",
        version=f"1.{secure_version}",
        secure_version=secure_version,
        project_name="fw",
        input_sha256=hashlib.sha256(image + b"in").digest(),
        output_sha256=hashlib.sha256(image).digest(),
        output_size=len(image),
        key_versions=("keys/k/versions/1",),
        signed_by="spiffe://kms.dev/build-server/ci",
        created_at=T0,
    )
    record = SignatureRecord(release.signed_by, "sign-image", "keys/k/versions/1", os.urandom(32), "x", T0)
    return repo.record(release, image, [record])


def _lowerings(db: Database) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db.path)
    try:
        return list(
            conn.execute(
                "SELECT product, from_secure_version, to_secure_version, officer, approval_id "
                "FROM floor_lowerings ORDER BY id"
            )
        )
    finally:
        conn.close()


def test_a_lowered_floor_accepts_lower_releases_and_rises_again(
    repo: SqliteReleaseRepository, db: Database
) -> None:
    assert repo.rollback_floor(PRODUCT).secure_version is None
    _sign(repo, 5)
    before = repo.rollback_floor(PRODUCT)
    assert (before.secure_version, before.lowered_at, before.lowered_by, before.lowering_request) == (
        5,
        None,
        None,
        None,
    )
    with pytest.raises(FailedPrecondition, match="below the floor 5 of product 'thermostat'"):
        _sign(repo, 3)

    lowered = repo.lower_floor(_lowering(5, 2))

    assert (lowered.secure_version, lowered.lowered_at, lowered.lowered_by, lowered.lowering_request) == (
        2,
        T0,
        ALICE.identity,
        "0123abcd",
    )
    assert repo.rollback_floor(PRODUCT) == lowered
    assert _lowerings(db) == [(PRODUCT, 5, 2, ALICE.identity, "0123abcd")]
    assert repo.secure_version_floor(PRODUCT) == 2
    _sign(repo, 3)  # accepted now, and the floor rises with it as before
    assert repo.rollback_floor(PRODUCT).secure_version == 3
    with pytest.raises(FailedPrecondition, match="floor 3"):
        _sign(repo, 2)
    assert repo.rollback_floor(PRODUCT).lowering_request == "0123abcd"  # the last lowering stays shown


def test_a_lowering_of_a_floor_that_moved_changes_nothing(
    repo: SqliteReleaseRepository, db: Database
) -> None:
    _sign(repo, 5)
    _sign(repo, 7)  # signed after the request saw 5
    with pytest.raises(FailedPrecondition, match="is now at 7, not at 5"):
        repo.lower_floor(_lowering(5, 2))
    assert repo.rollback_floor(PRODUCT).secure_version == 7
    assert _lowerings(db) == []


def test_floors_are_per_product(repo: SqliteReleaseRepository) -> None:
    _sign(repo, 5)
    _sign(repo, 9, product="doorbell")
    repo.lower_floor(_lowering(5, 1))
    assert repo.rollback_floor("doorbell").secure_version == 9
    assert repo.rollback_floor("doorbell").lowering_request is None
    with pytest.raises(FailedPrecondition, match="has no floor"):
        repo.lower_floor(_lowering(5, 1, product="lamp"))


# -- the use case: product scope -------------------------------------------------------------------------


def test_rollback_floors_are_scoped_to_the_product(repo: SqliteReleaseRepository) -> None:
    _sign(repo, 5)
    floors = RollbackFloors(repo, clock=lambda: T0)
    other = Caller("spiffe://kms.dev/security-officer/dora", Role.SECURITY_OFFICER, frozenset({"doorbell"}))
    for call in (
        lambda: floors.get(other, PRODUCT),
        lambda: floors.check_lowering(other, PRODUCT, 2),
        lambda: floors.lower(other, PRODUCT, 5, 2, "r1"),
    ):
        with pytest.raises(PermissionDenied, match="may not act for product 'thermostat'"):
            call()
    assert repo.rollback_floor(PRODUCT).secure_version == 5
    with pytest.raises(InvalidArgument, match="malformed product name"):
        floors.get(ALICE, "Not A Product")
    assert floors.check_lowering(ALICE, PRODUCT, 2) == 5
    lowered = floors.lower(ALICE, PRODUCT, 5, 2, "r1")
    assert (lowered.secure_version, lowered.lowered_by, lowered.lowered_at) == (2, ALICE.identity, T0)


def test_a_product_without_any_key_has_no_floor_to_read(db: Database, repo: SqliteReleaseRepository) -> None:
    """As ListSecureBootSlots: a product the service holds no key for is NOT_FOUND, not an empty floor that
    would read as "nothing signed yet" for a misspelt product name."""
    keys = SqliteKeyRepository(db)
    KeyAdministration(SoftwareHsm(), keys).create_key(
        "thermo-sbv2-0", PRODUCT, KeyPurpose.SECURE_BOOT_V2, Algorithm.ECDSA_P256_SHA256, 0
    )
    floors = RollbackFloors(repo, keys=keys)
    assert floors.get(ALICE, PRODUCT).secure_version is None  # known, nothing signed yet
    for unknown in ("thermostat2", "lamp"):
        with pytest.raises(NotFound, match=f"product '{unknown}' has no keys"):
            floors.get(ALICE, unknown)
        with pytest.raises(NotFound, match="has no keys"):
            floors.check_lowering(ALICE, unknown, 0)
    _sign(repo, 5)
    assert floors.get(ALICE, PRODUCT).secure_version == 5
