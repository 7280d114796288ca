"""The KEK rewrap loop as a process of its own, for the crash test (tests/integration/test_kek_rotation.py).

``python -m tests.support.kek_rewrap_worker DB PKCS11_URI BATCH`` opens the database and the token
(``SOFTHSM2_CONF`` comes from the environment), prints ``running`` once ready, resumes every unfinished
rotation job with ``KekRotationService.run`` and prints ``done`` when they are all finished. The test kills
it with SIGKILL at random moments. ``Stack`` wires the same objects for the tests themselves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from kms.domain.ports import Hsm
from kms.hsm.config import HsmConfig
from kms.hsm.pkcs11_hsm import Pkcs11Hsm
from kms.service.kek_rotation import KekRotationService, destroy_guard
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import KeyLifecycle
from kms.service.registry import DeviceRegistry
from kms.store.database import Database
from kms.store.devices import SqliteDeviceRepository
from kms.store.kek_rotations import SqliteKekRotationRepository
from kms.store.keys import SqliteKeyRepository
from kms.store.signature_log import SqliteSignatureLog


@dataclass
class Stack:
    """The use cases a KEK rotation involves, over one database and one HSM."""

    keys: SqliteKeyRepository
    devices: SqliteDeviceRepository
    rotations: SqliteKekRotationRepository
    signature_log: SqliteSignatureLog
    admin: KeyAdministration
    lifecycle: KeyLifecycle
    registry: DeviceRegistry
    kek_rotation: KekRotationService

    @classmethod
    def build(cls, hsm: Hsm, db: Database) -> Stack:
        keys = SqliteKeyRepository(db)
        devices = SqliteDeviceRepository(db)
        rotations = SqliteKekRotationRepository(db)
        log = SqliteSignatureLog(db)
        lifecycle = KeyLifecycle(hsm, keys, destroy_guard=destroy_guard(rotations))
        return cls(
            keys=keys,
            devices=devices,
            rotations=rotations,
            signature_log=log,
            admin=KeyAdministration(hsm, keys),
            lifecycle=lifecycle,
            registry=DeviceRegistry(hsm, keys, devices, log),
            kek_rotation=KekRotationService(hsm, keys, rotations, lifecycle, log),
        )

    def close(self) -> None:
        self.signature_log.close()


def main(argv: list[str]) -> int:
    db_path, uri, batch = Path(argv[0]), argv[1], int(argv[2])
    with Pkcs11Hsm(HsmConfig.from_uri(uri)) as hsm, Database.open(db_path) as db:
        stack = Stack.build(hsm, db)
        try:
            print("running", flush=True)
            for job in stack.kek_rotation.unfinished():
                stack.kek_rotation.run(job, batch=batch)
            print("done", flush=True)
        finally:
            stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
