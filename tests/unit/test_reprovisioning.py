"""Device re-provisioning: the registration rules (``kms.domain.devices``), the window in a real SQLite
registry (``kms.store.devices``), who installed the current secret (migration 11, ``DeviceInfo``, ``kmsctl
devices show``), and the product scope of ``DeviceReprovisioning``."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kms.domain.devices import (
    Device,
    DeviceState,
    Registration,
    WrappedSecret,
    check_reprovisionable,
    registration_outcome,
    reprovisioned,
)
from kms.domain.errors import AlreadyExists, FailedPrecondition, NotFound, PermissionDenied
from kms.domain.identity import Caller, Role
from kms.server.devices_servicers import device_pb
from kms.service.reprovisioning import DeviceReprovisioning
from kms.store.database import MIGRATIONS, Database, timestamp_text
from kms.store.devices import SqliteDeviceRepository
from kmsctl._wire import device_info
from kmsctl.cli import _device_summary

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
UNTIL = T0 + timedelta(hours=24)
DEVICE_ID = "24:6f:28:00:00:01"
OFFICER = Caller("spiffe://kms.dev/security-officer/alice", Role.SECURITY_OFFICER)
LINE_1 = "spiffe://kms.dev/factory-registrar/line-1"
LINE_2 = "spiffe://kms.dev/factory-registrar/line-2"


def _device(
    fingerprint: bytes,
    *,
    at: datetime = T0,
    product: str = "thermostat",
    chip: str = "esp32c6",
    ecies: bytes | None = None,
    by: str = LINE_1,
) -> Device:
    return Device(
        device_id=DEVICE_ID,
        product=product,
        chip=chip,
        state=DeviceState.ACTIVE,
        secret=WrappedSecret("thermostat-kek", 1, "CKM_AES_KEY_WRAP_PAD(0x210A)", os.urandom(40)),
        fingerprint=fingerprint,
        registered_by=by,
        registered_at=at,
        ecies_public_key=ecies,
    )


S1, S2, S3 = (bytes([n]) * 32 for n in (1, 2, 3))  # fingerprints standing for three secrets


# -- the rules -------------------------------------------------------------------------------------------


def test_without_an_open_window_another_secret_is_refused() -> None:
    stored = _device(S1)
    assert registration_outcome(None, stored) is Registration.CREATED
    assert registration_outcome(stored, _device(S1, at=T0 + timedelta(days=1))) is Registration.UNCHANGED
    refused = registration_outcome(stored, _device(S2))
    assert isinstance(refused, AlreadyExists)
    assert "kmsctl devices reprovision 24:6f:28:00:00:01" in str(refused)


def test_an_open_window_admits_another_secret_until_it_closes() -> None:
    opened = replace(_device(S1), reprovision_until=UNTIL, reprovision_request="r1")
    assert registration_outcome(opened, _device(S2, at=UNTIL - timedelta(seconds=1))) is (
        Registration.REPROVISIONED
    )
    assert registration_outcome(opened, _device(S1)) is Registration.UNCHANGED  # same secret: stays open
    assert isinstance(registration_outcome(opened, _device(S2, at=UNTIL)), AlreadyExists)  # expired
    revoked = replace(opened, state=DeviceState.REVOKED)
    assert isinstance(registration_outcome(revoked, _device(S2)), AlreadyExists)


def test_a_reprovisioned_device_keeps_its_product_and_chip() -> None:
    opened = replace(_device(S1), reprovision_until=UNTIL, reprovision_request="r1")
    other_product = registration_outcome(opened, _device(S2, product="doorbell"))
    assert isinstance(other_product, AlreadyExists) and "registered for another product" in str(other_product)
    other_chip = registration_outcome(opened, _device(S2, chip="esp32s3"))
    assert isinstance(other_chip, FailedPrecondition)
    assert "registered as an esp32c6, not an esp32s3" in str(other_chip)


def test_reprovisioning_replaces_the_secret_and_what_derives_from_it() -> None:
    opened = replace(_device(S1, ecies=b"\x01" * 64), reprovision_until=UNTIL, reprovision_request="r1")
    candidate = _device(S2, at=T0 + timedelta(hours=1))
    after = reprovisioned(opened, candidate)
    assert (after.secret, after.fingerprint) == (candidate.secret, S2)
    assert after.ecies_public_key is None  # derived from the old secret on the device: not kept
    assert (after.secret_generation, after.reprovision_until, after.reprovision_request) == (2, None, None)
    assert (after.registered_by, after.registered_at) == (opened.registered_by, opened.registered_at)
    assert reprovisioned(opened, _device(S2, ecies=b"\x02" * 64)).ecies_public_key == b"\x02" * 64


def test_the_current_secret_names_who_registered_it_and_under_which_request() -> None:
    first = _device(S1)  # a registration names no secret registrar: the first secret is the registrar's
    assert (first.secret_registered_by, first.secret_registered_at, first.reprovisioned_under) == (
        LINE_1,
        T0,
        None,
    )
    opened = replace(first, reprovision_until=UNTIL, reprovision_request="r1")
    later = T0 + timedelta(hours=1)
    after = reprovisioned(opened, _device(S2, at=later, by=LINE_2))
    assert (after.registered_by, after.registered_at) == (LINE_1, T0)  # the first registration stays
    assert (after.secret_registered_by, after.secret_registered_at, after.reprovisioned_under) == (
        LINE_2,
        later,
        "r1",
    )
    third = reprovisioned(replace(after, reprovision_until=UNTIL, reprovision_request="r2"), _device(S3))
    assert (third.secret_generation, third.secret_registered_by, third.reprovisioned_under) == (
        3,
        LINE_1,
        "r2",
    )


def test_a_revoked_device_cannot_be_opened() -> None:
    assert check_reprovisionable(_device(S1)).device_id == DEVICE_ID
    with pytest.raises(FailedPrecondition, match="revoked; a revoked device cannot be re-provisioned"):
        check_reprovisionable(replace(_device(S1), state=DeviceState.REVOKED))


# -- the store -------------------------------------------------------------------------------------------


@pytest.fixture
def devices(tmp_path: Path) -> Iterator[SqliteDeviceRepository]:
    with Database.open(tmp_path / "kms.db") as db:
        yield SqliteDeviceRepository(db)


def test_one_window_admits_one_new_secret(devices: SqliteDeviceRepository) -> None:
    assert devices.add_many([_device(S1)]) == [Registration.CREATED]
    assert isinstance(devices.add_many([_device(S2)])[0], AlreadyExists)
    opened = devices.open_reprovisioning(DEVICE_ID, UNTIL, "r1")
    assert (opened.reprovision_until, opened.reprovision_request, opened.secret_generation) == (
        UNTIL,
        "r1",
        1,
    )
    assert devices.add_many([_device(S1, at=T0 + timedelta(minutes=1))]) == [Registration.UNCHANGED]
    assert devices.get(DEVICE_ID).reprovision_until == UNTIL

    first = devices.get(DEVICE_ID)  # generation 1 as stored: the current secret is the registration's
    assert (first.secret_registered_by, first.secret_registered_at, first.reprovisioned_under) == (
        LINE_1,
        T0,
        None,
    )

    candidate = _device(S2, at=T0 + timedelta(minutes=2), by=LINE_2)
    assert devices.add_many([candidate]) == [Registration.REPROVISIONED]

    stored = devices.get(DEVICE_ID)
    assert (stored.fingerprint, stored.secret, stored.secret_generation) == (S2, candidate.secret, 2)
    assert (stored.reprovision_until, stored.reprovision_request) == (None, None)
    assert (stored.registered_by, stored.registered_at) == (LINE_1, T0)
    assert (stored.secret_registered_by, stored.secret_registered_at, stored.reprovisioned_under) == (
        LINE_2,
        T0 + timedelta(minutes=2),
        "r1",
    )
    assert isinstance(devices.add_many([_device(S3, at=T0 + timedelta(minutes=3))])[0], AlreadyExists)
    assert devices.add_many([_device(S2, at=T0 + timedelta(minutes=3))]) == [Registration.UNCHANGED]


def test_an_expired_window_admits_nothing(devices: SqliteDeviceRepository) -> None:
    devices.add_many([_device(S1)])
    devices.open_reprovisioning(DEVICE_ID, UNTIL, "r1")
    assert isinstance(devices.add_many([_device(S2, at=UNTIL)])[0], AlreadyExists)
    assert devices.get(DEVICE_ID).fingerprint == S1


def test_revoking_closes_the_window_and_a_revoked_device_is_not_opened(
    devices: SqliteDeviceRepository,
) -> None:
    devices.add_many([_device(S1)])
    devices.open_reprovisioning(DEVICE_ID, UNTIL, "r1")
    revoked = devices.revoke(DEVICE_ID, T0)
    assert (revoked.state, revoked.reprovision_until, revoked.reprovision_request) == (
        DeviceState.REVOKED,
        None,
        None,
    )
    with pytest.raises(FailedPrecondition, match="revoked"):
        devices.open_reprovisioning(DEVICE_ID, UNTIL, "r2")
    with pytest.raises(NotFound):
        devices.open_reprovisioning("24:6f:28:00:00:99", UNTIL, "r2")


def test_migration_11_records_generation_1_secrets_as_their_registration(tmp_path: Path) -> None:
    path = tmp_path / "kms.db"
    # as the previous release left it
    with Database.open(path, migrations=MIGRATIONS[:10]) as db, db.transaction() as session:
        for device_id, generation in (("first", 1), ("replaced", 2)):
            session.execute(
                "INSERT INTO devices (device_id, product, chip, state, kek_key_id, kek_version, "
                "wrap_mechanism, wrapped_secret, fingerprint, registered_by, registered_at, "
                "secret_generation) VALUES (?, 'thermostat', 'esp32c6', 'active', 'thermostat-kek', 1, "
                "'CKM_AES_KEY_WRAP_PAD(0x210A)', ?, ?, ?, ?, ?)",
                [device_id, os.urandom(40), S1, LINE_1, timestamp_text(T0), generation],
            )
    with Database.open(path) as db:
        repository = SqliteDeviceRepository(db)
        first, replaced = repository.get("first"), repository.get("replaced")
    assert (first.secret_registered_by, first.secret_registered_at, first.reprovisioned_under) == (
        LINE_1,
        T0,
        None,
    )
    # Re-provisioned before the registry recorded by whom: not made up.
    assert (replaced.secret_registered_by, replaced.secret_registered_at) == (None, None)
    connection = sqlite3.connect(path)
    try:
        columns = {str(r[1]) for r in connection.execute("PRAGMA table_info(devices)")}
    finally:
        connection.close()
    assert {"secret_registered_by", "secret_registered_at", "reprovisioned_under"} <= columns


# -- DeviceInfo and kmsctl devices show ------------------------------------------------------------------


def test_device_info_and_show_name_who_installed_the_current_secret() -> None:
    opened = replace(_device(S1), reprovision_until=UNTIL, reprovision_request="4f2a")
    later = T0 + timedelta(hours=1)
    after = reprovisioned(opened, _device(S2, at=later, by=LINE_2))

    message = device_pb(after, later)
    assert (message.registered_by, message.register_time.ToDatetime(tzinfo=UTC)) == (LINE_1, T0)
    assert message.secret_registered_by == LINE_2
    assert message.secret_register_time.ToDatetime(tzinfo=UTC) == later
    assert message.reprovisioned_under == "approvals/4f2a"
    shown = _device_summary("device x", device_info(message))
    assert f"registered by   {LINE_1}" in shown
    assert f"secret by       {LINE_2}" in shown
    assert f"secret at       {later.isoformat()}" in shown
    assert "approved under  approvals/4f2a" in shown

    first = device_pb(_device(S1), T0)
    assert (first.secret_registered_by, first.reprovisioned_under) == (LINE_1, "")
    assert first.secret_register_time == first.register_time
    assert "secret by" not in _device_summary("device x", device_info(first))  # same as registered by

    unknown = device_pb(replace(after, secret_registered_by=None, secret_registered_at=None), later)
    assert not unknown.HasField("secret_register_time")
    assert "secret by       (not recorded)" in _device_summary("device x", device_info(unknown))


# -- the use case: product scope -------------------------------------------------------------------------


def test_reprovisioning_is_scoped_to_the_devices_product(devices: SqliteDeviceRepository) -> None:
    devices.add_many([_device(S1)])
    reprovisioning = DeviceReprovisioning(devices)
    other = Caller("spiffe://kms.dev/security-officer/dora", Role.SECURITY_OFFICER, frozenset({"doorbell"}))
    with pytest.raises(PermissionDenied, match="may not act for product 'thermostat'"):
        reprovisioning.check_request(other, DEVICE_ID)
    with pytest.raises(PermissionDenied):
        reprovisioning.open(other, DEVICE_ID, UNTIL, "r1")
    assert devices.get(DEVICE_ID).reprovision_until is None
    assert reprovisioning.open(OFFICER, DEVICE_ID, UNTIL, "r1").reprovision_until == UNTIL
