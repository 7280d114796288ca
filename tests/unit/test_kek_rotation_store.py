"""KEK rotation jobs and the compare-and-set rewrite of device secrets (``kms.store.kek_rotations``), and the
rewrap loop's resumption after a failure part-way (``kms.service.kek_rotation``), with a fake HSM."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kms.domain.devices import Device, DeviceState, WrappedSecret
from kms.domain.errors import FailedPrecondition, HsmUnavailable, KmsError
from kms.domain.identity import Caller, Role
from kms.domain.kek_rotation import KekRotation, Rewrap, StoredSecret
from kms.domain.keys import Algorithm, KeyPurpose
from kms.server.kek_rotation_runner import KekRotationRunner
from kms.service.kek_rotation import KekRotationService, destroy_guard
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import KeyLifecycle
from kms.store.database import Database
from kms.store.devices import SqliteDeviceRepository
from kms.store.kek_rotations import SqliteKekRotationRepository
from kms.store.keys import SqliteKeyRepository
from kms.store.signature_log import SqliteSignatureLog
from tests.support.fake_admin import SoftwareHsm

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
OFFICER = Caller("spiffe://kms.example/security-officer/alice", Role.SECURITY_OFFICER)


class RewrapHsm(SoftwareHsm):
    """Rewraps by prefixing the new KEK's id's first byte; ``fail_after`` batches then HsmUnavailable."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: int | None = None
        self.batches = 0

    def rewrap_secrets(
        self, old_kek_hsm_id: bytes, new_kek_hsm_id: bytes, blobs: Sequence[bytes]
    ) -> list[bytes | KmsError]:
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise HsmUnavailable("the HSM cannot be reached (fake)")
        self.batches += 1
        return [new_kek_hsm_id[:1] + blob[1:] for blob in blobs]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database.open(tmp_path / "kms.db") as database:
        yield database


def _device(n: int, version: int = 1) -> Device:
    return Device(
        device_id=f"dev-{n:04d}",
        product="widget",
        chip="esp32c3",
        state=DeviceState.ACTIVE,
        secret=WrappedSecret(
            "widget-kek", version, "CKM_AES_KEY_WRAP(0x2109)/RFC3394", bytes([n % 256]) * 40
        ),
        fingerprint=n.to_bytes(32, "big"),
        registered_by="factory",
        registered_at=T0,
    )


def _setup(db: Database, hsm: SoftwareHsm, count: int) -> SqliteDeviceRepository:
    keys = SqliteKeyRepository(db)
    KeyAdministration(hsm, keys).create_key(
        "widget-kek", "widget", KeyPurpose.KEY_ENCRYPTION, Algorithm.AES_256, None
    )
    KeyLifecycle(hsm, keys).rotate(OFFICER, "widget-kek")  # version 2 exists for the jobs
    devices = SqliteDeviceRepository(db)
    devices.add_many([_device(n) for n in range(count)])
    return devices


def _job(to_version: int = 2) -> KekRotation:
    return KekRotation("widget-kek", "widget", 1, to_version, OFFICER.identity, T0)


def test_batches_page_by_device_id(db: Database) -> None:
    devices = _setup(db, SoftwareHsm(), 7)
    first = devices.devices_under("widget-kek", 1, 3)
    assert [s.device_id for s in first] == ["dev-0000", "dev-0001", "dev-0002"]
    rest = devices.devices_under("widget-kek", 1, 10, first[-1].device_id)
    assert [s.device_id for s in rest] == [f"dev-{n:04d}" for n in range(3, 7)]
    assert devices.count_under("widget-kek", 1) == 7 and devices.count_under("widget-kek", 2) == 0


def test_rewrap_is_compare_and_set(db: Database) -> None:
    devices = _setup(db, SoftwareHsm(), 3)
    stored = devices.devices_under("widget-kek", 1, 10)
    rewraps = [Rewrap(s, 2, b"\xee" * 40) for s in stored]
    assert devices.rewrap("widget-kek", rewraps) == 3
    assert devices.rewrap("widget-kek", rewraps) == 0  # a rerun changes nothing
    stale = Rewrap(StoredSecret("dev-0001", 1, b"\x01" * 40), 3, b"\xdd" * 40)
    assert devices.rewrap("widget-kek", [stale]) == 0  # the row moved on meanwhile
    wrong_blob = Rewrap(StoredSecret("dev-0001", 2, b"\x00" * 40), 3, b"\xdd" * 40)
    assert devices.rewrap("widget-kek", [wrong_blob]) == 0
    assert {devices.get(s.device_id).secret.blob for s in stored} == {b"\xee" * 40}
    assert devices.count_under("widget-kek", 1) == 0 and devices.count_under("widget-kek", 2) == 3


def test_job_counter_moves_with_the_rows(db: Database) -> None:
    devices = _setup(db, SoftwareHsm(), 4)
    rotations = SqliteKekRotationRepository(db)
    job = _job()
    rotations.start(job)
    with pytest.raises(FailedPrecondition, match="still running"):
        rotations.start(_job())
    stored = rotations.secrets_under("widget-kek", 1, 10)
    rewraps = [Rewrap(s, 2, b"\xee" * 40) for s in stored]
    assert rotations.record_batch(job, rewraps[:3]) == 3
    assert rotations.record_batch(job, rewraps) == 1  # the first three are done already
    assert rotations.record_batch(job, rewraps) == 0
    assert rotations.unfinished()[0].rewrapped == 4
    finished = rotations.finish(job, T0)
    assert finished.finished_at == T0 and finished.rewrapped == 4
    assert rotations.finish(job, datetime(2030, 1, 1, tzinfo=UTC)).finished_at == T0  # idempotent
    assert rotations.unfinished() == [] and rotations.latest("widget-kek") == finished
    assert rotations.versions_in_use("widget-kek") == [2]
    assert devices.count("widget") == 4


def test_job_state_survives_reopening(tmp_path: Path) -> None:
    with Database.open(tmp_path / "kms.db") as first:
        _setup(first, SoftwareHsm(), 2)
        SqliteKekRotationRepository(first).start(_job())
    with Database.open(tmp_path / "kms.db") as again:
        [job] = SqliteKekRotationRepository(again).unfinished()
        assert job == _job()


def test_run_resumes_after_a_failure_part_way(db: Database) -> None:
    hsm = RewrapHsm()
    devices = _setup(db, hsm, 25)
    keys = SqliteKeyRepository(db)
    rotations = SqliteKekRotationRepository(db)
    log = SqliteSignatureLog(db)
    try:
        lifecycle = KeyLifecycle(hsm, keys, destroy_guard=destroy_guard(rotations), clock=lambda: T0)
        service = KekRotationService(hsm, keys, rotations, lifecycle, log, clock=lambda: T0)
        job = service.start(OFFICER, "widget")
        assert job.to_version == 3
        hsm.fail_after = 2
        with pytest.raises(HsmUnavailable):
            service.run(job, batch=10)
        assert service.status("widget").rotation.rewrapped == 20
        assert service.status("widget").remaining == 5
        with pytest.raises(FailedPrecondition, match="5 device secrets"):
            lifecycle.schedule_destroy(OFFICER, "keys/widget-kek/versions/1")
        hsm.fail_after = None
        [resumed] = service.unfinished()
        status = service.run(resumed, batch=10)
        assert status.rotation.finished and status.rotation.rewrapped == 25 and status.remaining == 0
        assert {devices.get(f"dev-{n:04d}").secret.kek_version for n in range(25)} == {3}
        lifecycle.schedule_destroy(OFFICER, "keys/widget-kek/versions/1")
    finally:
        log.close()


def test_run_stops_between_batches_when_asked(db: Database) -> None:
    hsm = RewrapHsm()
    _setup(db, hsm, 25)
    keys = SqliteKeyRepository(db)
    rotations = SqliteKekRotationRepository(db)
    log = SqliteSignatureLog(db)
    try:
        service = KekRotationService(hsm, keys, rotations, KeyLifecycle(hsm, keys), log)
        job = service.start(OFFICER, "widget")
        status = service.run(job, batch=10, stopping=lambda: hsm.batches >= 1)
        assert not status.rotation.finished and status.rotation.rewrapped == 10 and status.remaining == 15
    finally:
        log.close()


def test_the_runner_resumes_unfinished_jobs_and_survives_failures(db: Database) -> None:
    hsm = RewrapHsm()
    _setup(db, hsm, 30)
    keys = SqliteKeyRepository(db)
    log = SqliteSignatureLog(db)
    try:
        service = KekRotationService(hsm, keys, SqliteKekRotationRepository(db), KeyLifecycle(hsm, keys), log)
        service.start(OFFICER, "widget")  # recorded, never run: as after a crash
        runner = KekRotationRunner(service, interval=0.01, batch=10)
        hsm.fail_after = 1
        assert runner.run_once() == 0  # the HSM failed part-way: logged, the job stays unfinished
        assert service.status("widget").rotation.rewrapped == 10
        hsm.fail_after = None
        runner.start()
        deadline = time.monotonic() + 10
        while not service.status("widget").rotation.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        runner.stop(timeout=10)
        status = service.status("widget")
        assert status.rotation.finished and status.rotation.rewrapped == 30 and status.remaining == 0
    finally:
        log.close()
