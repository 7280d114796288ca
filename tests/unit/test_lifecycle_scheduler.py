"""LifecycleScheduler: scheduled destructions and rotations happen, and the thread outlives any failure."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from kms.domain.errors import HsmUnavailable
from kms.domain.identity import Caller, Role
from kms.domain.keys import Algorithm, KeyPurpose, KeyVersionState
from kms.server.lifecycle_scheduler import LifecycleScheduler
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import SCHEDULER, KeyLifecycle, SweepResult
from kms.store.database import Database
from kms.store.keys import SqliteKeyRepository
from tests.support.fake_admin import T0, Clock, SoftwareHsm

OFFICER = Caller("spiffe://kms.dev/security-officer/dev", Role.SECURITY_OFFICER)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[SqliteKeyRepository]:
    with Database.open(tmp_path / "kms.db") as database:
        yield SqliteKeyRepository(database)


def test_a_run_destroys_what_is_due_and_rotates_what_is_due(
    repo: SqliteKeyRepository, caplog: pytest.LogCaptureFixture
) -> None:
    hsm, clock = SoftwareHsm(), Clock()
    lifecycle = KeyLifecycle(hsm, repo, clock=clock)
    admin = KeyAdministration(hsm, repo, clock)
    fw = admin.create_key("fw", "p", KeyPurpose.DIGEST_SIGNING, Algorithm.ECDSA_P256_SHA256, None)
    lifecycle.rotate(OFFICER, "fw")
    lifecycle.schedule_destroy(OFFICER, "keys/fw/versions/1", delay=timedelta(hours=1))
    admin.create_key("manifest", "p", KeyPurpose.OTA_MANIFEST, Algorithm.ECDSA_P256_SHA256, None)
    lifecycle.set_rotation_schedule(OFFICER, "manifest", timedelta(days=1))
    scheduler = LifecycleScheduler(lifecycle, clock=clock)

    assert scheduler.run_once() == (SweepResult(), SweepResult()), "nothing is due yet"
    clock.now = T0 + timedelta(days=1)
    with caplog.at_level(logging.INFO, logger="kms.lifecycle"):
        destroyed, rotated = scheduler.run_once()

    assert destroyed == SweepResult(done=("keys/fw/versions/1",))
    assert rotated == SweepResult(done=("keys/manifest/versions/2",))
    assert fw.version(1).hsm_id not in hsm.held
    assert lifecycle.get("fw").version(1).state is KeyVersionState.DESTROYED
    assert lifecycle.get("manifest").key.primary_version == 2
    assert {t.actor for t in lifecycle.transitions("keys/manifest/versions/2")} == {SCHEDULER}
    assert "scheduled destruction done: keys/fw/versions/1" in caplog.text
    assert "scheduled rotation done: keys/manifest/versions/2" in caplog.text


class Flaky:
    """A lifecycle whose sweeps fail in the ways a server meets: a bug, an HSM error, then success."""

    def __init__(self) -> None:
        self.destroy_calls: list[datetime] = []
        self.rotate_calls = 0
        self.first_run = threading.Event()
        self.third_run = threading.Event()

    def destroy_due(self, now: datetime) -> SweepResult:
        self.destroy_calls.append(now)
        if len(self.destroy_calls) == 1:
            raise RuntimeError("database file vanished")
        if len(self.destroy_calls) == 2:
            raise HsmUnavailable("the HSM cannot be reached")
        return SweepResult(failed=(("keys/fw/versions/1", HsmUnavailable("still down")),))

    def rotate_due(self, now: datetime) -> SweepResult:
        self.rotate_calls += 1
        self.first_run.set()
        if len(self.destroy_calls) >= 3:
            self.third_run.set()
        return SweepResult()


def test_the_thread_survives_failures_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    flaky = Flaky()
    scheduler = LifecycleScheduler(flaky, interval=0.01)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="kms.lifecycle"):
        scheduler.start()
        assert flaky.third_run.wait(10)
        scheduler.stop(timeout=10)
    calls = len(flaky.destroy_calls)
    assert flaky.rotate_calls == calls, "a failed destruction sweep does not hold up rotations"
    assert "scheduled destruction failed; next try" in caplog.text
    assert "RuntimeError: database file vanished" in caplog.text, "a bug is logged with its traceback"
    assert "scheduled destruction failed: the HSM cannot be reached" in caplog.text
    assert "scheduled destruction failed for keys/fw/versions/1" in caplog.text
    threading.Event().wait(0.05)
    assert len(flaky.destroy_calls) == calls, "no run after stop()"
    with pytest.raises(RuntimeError, match="started already"):
        scheduler.start()


def test_stop_without_start_and_bad_interval() -> None:
    LifecycleScheduler(Flaky()).stop()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        LifecycleScheduler(Flaky(), interval=0)  # type: ignore[arg-type]


def test_stop_interrupts_the_wait() -> None:
    flaky = Flaky()
    scheduler = LifecycleScheduler(flaky, interval=3600)  # type: ignore[arg-type]
    scheduler.start()
    assert flaky.first_run.wait(10), "the first run happens at once"
    started = datetime.now()
    scheduler.stop(timeout=10)
    assert datetime.now() - started < timedelta(seconds=5)
    assert len(flaky.destroy_calls) == 1
