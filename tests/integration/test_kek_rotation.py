"""KEK rotation against SoftHSM2 and a real SQLite file (``kms.service.kek_rotation``).

Devices are registered through ``DeviceRegistry`` (secrets wrapped in the HSM under the product's KEK);
each device's payload key is ``hmac_with_wrapped_secret`` over a fixed message, computed before and after:
a rotation must leave every payload key unchanged, move every row to the new version, and keep the old
version from destruction until no row depends on it. The crash test runs the rewrap loop in a subprocess
(``tests.support.kek_rewrap_worker``) and kills it with SIGKILL at random moments, several times, then
lets a final run complete.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.domain.devices import Registration
from kms.domain.errors import FailedPrecondition, HsmFailure
from kms.domain.identity import Caller, Role
from kms.domain.kek_rotation import KekRotationStatus
from kms.domain.keys import Algorithm, KeyPurpose, KeyVersionState
from kms.hsm.pkcs11_hsm import Pkcs11Hsm
from kms.service.registry import RegistrationRow
from kms.store.database import Database
from tests.support.kek_rewrap_worker import Stack
from tests.support.softhsm import REPO_ROOT, SoftHsmToken

pytestmark = pytest.mark.integration

OFFICER = Caller("spiffe://kms.example/security-officer/alice", Role.SECURITY_OFFICER)
REGISTRAR = Caller("spiffe://kms.example/factory-registrar/line1", Role.FACTORY_REGISTRAR)
MESSAGE = b"FKSP/1 payload key test message\x01"


@pytest.fixture
def stack(hsm: Pkcs11Hsm, tmp_path: Path) -> Iterator[Stack]:
    with Database.open(tmp_path / "kms.db") as db:
        built = Stack.build(hsm, db)
        try:
            yield built
        finally:
            built.close()


def _register(stack: Stack, product: str, count: int) -> list[str]:
    stack.admin.create_key(f"{product}-kek", product, KeyPurpose.KEY_ENCRYPTION, Algorithm.AES_256, None)
    ids = [f"{product}-dev-{n:05d}" for n in range(count)]
    for start in range(0, count, 1000):
        rows = [
            RegistrationRow(n, device_id, "esp32c3", secrets.token_bytes(32))
            for n, device_id in enumerate(ids[start : start + 1000])
        ]
        results = stack.registry.register(REGISTRAR, product, rows, None)
        assert all(not isinstance(r.outcome, Exception) for r in results)
    return ids


def _payload_keys(stack: Stack, hsm: Pkcs11Hsm, ids: list[str]) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for device_id in ids:
        device = stack.devices.get(device_id)
        version = stack.keys.get_key(device.secret.kek_key_id).version(device.secret.kek_version)
        keys[device_id] = hsm.hmac_with_wrapped_secret(version.hsm_id, device.secret.blob, MESSAGE)
    return keys


def _kek_versions(stack: Stack, ids: list[str]) -> set[int]:
    return {stack.devices.get(device_id).secret.kek_version for device_id in ids}


def test_rotation_keeps_every_payload_key_and_guards_the_old_version(stack: Stack, hsm: Pkcs11Hsm) -> None:
    ids = _register(stack, "rot-a", 1200)
    before = _payload_keys(stack, hsm, ids)
    assert _kek_versions(stack, ids) == {1}

    rotation = stack.kek_rotation.start(OFFICER, "rot-a")
    assert (rotation.from_version, rotation.to_version) == (1, 2)
    assert stack.keys.get_key("rot-a-kek").primary_version == 2
    # New registrations use the new version at once; payloads from old rows are still served.
    [late] = stack.registry.register(
        REGISTRAR, "rot-a", [RegistrationRow(0, "rot-a-late", "esp32c3", secrets.token_bytes(32))], None
    )
    assert late.outcome is Registration.CREATED
    assert stack.devices.get("rot-a-late").secret.kek_version == 2
    assert _payload_keys(stack, hsm, ids[:10]) == {i: before[i] for i in ids[:10]}
    with pytest.raises(FailedPrecondition, match="1200 device secrets"):
        stack.lifecycle.schedule_destroy(OFFICER, "keys/rot-a-kek/versions/1")
    with pytest.raises(FailedPrecondition, match="still running"):
        stack.kek_rotation.start(OFFICER, "rot-a")

    seen: list[KekRotationStatus] = []
    started = time.monotonic()
    status = stack.kek_rotation.run(rotation, batch=500, progress=seen.append)
    elapsed = time.monotonic() - started
    print(f"\nrewrapped {status.rotation.rewrapped} secrets in {elapsed:.2f} s: {1200 / elapsed:.0f}/s")

    assert status.rotation.finished and status.rotation.rewrapped == 1200 and status.remaining == 0
    assert [s.rotation.rewrapped for s in seen] == [500, 1000, 1200]
    assert [s.remaining for s in seen] == [700, 200, 0]
    assert _kek_versions(stack, ids) == {2}
    assert _payload_keys(stack, hsm, ids) == before
    assert stack.kek_rotation.status("rot-a").rotation == status.rotation

    # Idempotent: running the finished job again changes nothing.
    again = stack.kek_rotation.run(rotation)
    assert again.rotation.rewrapped == 1200 and again.remaining == 0
    managed = stack.lifecycle.schedule_destroy(OFFICER, "keys/rot-a-kek/versions/1")
    assert managed.version(1).state is KeyVersionState.DESTROY_SCHEDULED
    with pytest.raises(FailedPrecondition, match="device secrets"):
        stack.lifecycle.schedule_destroy(OFFICER, "keys/rot-a-kek/versions/2")


def test_a_damaged_blob_is_left_behind_and_keeps_its_version(stack: Stack, hsm: Pkcs11Hsm) -> None:
    ids = _register(stack, "rot-b", 20)
    before = _payload_keys(stack, hsm, ids)
    damaged = stack.devices.get(ids[7]).secret.blob
    with stack.devices._db.transaction() as session:
        session.execute(
            "UPDATE devices SET wrapped_secret = ? WHERE device_id = ?",
            [bytes([damaged[0] ^ 1]) + damaged[1:], ids[7]],
        )
    rotation = stack.kek_rotation.start(OFFICER, "rot-b")
    status = stack.kek_rotation.run(rotation, batch=6)
    assert status.rotation.finished and status.rotation.rewrapped == 19 and status.remaining == 1
    assert stack.devices.get(ids[7]).secret.kek_version == 1
    intact = [i for i in ids if i != ids[7]]
    assert _payload_keys(stack, hsm, intact) == {i: before[i] for i in intact}
    with pytest.raises(FailedPrecondition, match="1 device secrets"):
        stack.lifecycle.schedule_destroy(OFFICER, "keys/rot-b-kek/versions/1")


def test_rewrap_refuses_a_blob_of_another_kek(stack: Stack, hsm: Pkcs11Hsm) -> None:
    ids = _register(stack, "rot-c", 1)
    blob = stack.devices.get(ids[0]).secret.blob
    v1 = stack.keys.get_key("rot-c-kek").version(1)
    v2 = stack.lifecycle.rotate(OFFICER, "rot-c-kek")
    [moved, short] = hsm.rewrap_secrets(v1.hsm_id, v2.hsm_id, [blob, blob[:39]])
    assert isinstance(moved, bytes) and len(moved) == 40 and moved != blob
    assert isinstance(short, Exception)
    [wrong] = hsm.rewrap_secrets(v2.hsm_id, v1.hsm_id, [blob])
    assert isinstance(wrong, HsmFailure)
    assert hsm.hmac_with_wrapped_secret(v2.hsm_id, moved, MESSAGE) == hsm.hmac_with_wrapped_secret(
        v1.hsm_id, blob, MESSAGE
    )


def _worker(db: Path, token: SoftHsmToken, batch: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.kek_rewrap_worker", str(db), token.uri, str(batch)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


def test_rewrap_killed_at_random_points_loses_nothing(
    stack: Stack, hsm: Pkcs11Hsm, softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    ids = _register(stack, "rot-crash", 3000)
    before = _payload_keys(stack, hsm, ids)
    rotation = stack.kek_rotation.start(OFFICER, "rot-crash")
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    kills = 0
    progress: list[int] = []
    for _ in range(6):
        worker = _worker(tmp_path / "kms.db", softhsm_token, batch=rng.choice([10, 25, 50]))
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "running"
        time.sleep(rng.uniform(0.0, 0.1))
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            kills += 1
        worker.wait(timeout=30)
        worker.stdout.close()
        status = stack.kek_rotation.status("rot-crash")
        # The counter moves with the rows: it always equals the rows moved so far, with none lost.
        assert status.rotation.rewrapped + status.remaining == 3000
        assert stack.devices.count("rot-crash") == 3000
        progress.append(status.rotation.rewrapped)
    assert kills >= 3, f"the worker finished too early to be killed: {progress}"

    final = _worker(tmp_path / "kms.db", softhsm_token, batch=100)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0 and out.split() == ["running", "done"]

    status = stack.kek_rotation.status("rot-crash")
    assert status.rotation.finished and status.rotation.rewrapped == 3000 and status.remaining == 0
    assert stack.devices.count("rot-crash") == 3000
    assert _kek_versions(stack, ids) == {rotation.to_version}
    assert _payload_keys(stack, hsm, ids) == before
    print(f"\nkilled {kills} times; rewrapped after each run: {progress}")


def test_payload_keys_are_served_throughout_the_rewrap(stack: Stack, hsm: Pkcs11Hsm) -> None:
    ids = _register(stack, "rot-live", 2000)
    before = _payload_keys(stack, hsm, ids)
    rotation = stack.kek_rotation.start(OFFICER, "rot-live")
    served: list[tuple[str, bytes]] = []
    done = threading.Event()

    def serve() -> None:  # a distribution server deriving payload keys while the rewrap runs
        rng = random.Random(1)
        while not done.is_set():
            device_id = rng.choice(ids)
            served.append((device_id, _payload_keys(stack, hsm, [device_id])[device_id]))

    reader = threading.Thread(target=serve)
    reader.start()
    try:
        stack.kek_rotation.run(rotation, batch=50)
    finally:
        done.set()
        reader.join()
    assert len(served) > 10
    assert all(before[device_id] == key for device_id, key in served)
    assert _payload_keys(stack, hsm, ids) == before
