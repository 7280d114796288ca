"""``kmsctl kek rotate|status`` against the real ``KekRotationServicer`` and ``KekRotationRunner`` over
mutual TLS, on a fake HSM (``tests.support.fake_admin``) and a real SQLite file. The ``kek`` commands are
added to the parser here when ``kmsctl.cli`` does not register them (yet)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from kms.domain.devices import Device, DeviceState, WrappedSecret
from kms.domain.errors import KmsError
from kms.domain.keys import Algorithm, KeyPurpose
from kms.server.kek_rotation_runner import KekRotationRunner
from kms.server.kek_servicers import add_kek_rotation
from kms.server.pki import create_dev_pki
from kms.service.kek_rotation import KekRotationService, destroy_guard
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import KeyLifecycle
from kms.store.database import Database
from kms.store.devices import SqliteDeviceRepository
from kms.store.kek_rotations import SqliteKekRotationRepository
from kms.store.keys import SqliteKeyRepository
from kms.store.signature_log import SqliteSignatureLog
from kmsctl import cli as kmsctl_cli
from kmsctl._kek_cli import add_kek_commands
from tests.support.fake_admin import SoftwareHsm

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)


class RewrapHsm(SoftwareHsm):
    def rewrap_secrets(
        self, old_kek_hsm_id: bytes, new_kek_hsm_id: bytes, blobs: Sequence[bytes]
    ) -> list[bytes | KmsError]:
        return [new_kek_hsm_id[:1] + blob[1:] for blob in blobs]


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.fixture(autouse=True)
def kek_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_VERBOSITY", "ERROR")
    original = kmsctl_cli.build_parser

    def build_parser() -> argparse.ArgumentParser:
        parser = original()
        commands = _subcommands(parser)
        if "kek" not in commands.choices:  # not registered by cli.py (yet)
            add_kek_commands(commands, [kmsctl_cli._connection_options(), kmsctl_cli._output_options()])
        return parser

    monkeypatch.setattr(kmsctl_cli, "build_parser", build_parser)


class Served:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        create_dev_pki(state_dir / "pki")
        self.db = Database.open(state_dir / "kms.db")
        hsm = RewrapHsm()
        keys = SqliteKeyRepository(db := self.db)
        rotations = SqliteKekRotationRepository(db)
        self.log = SqliteSignatureLog(db)
        lifecycle = KeyLifecycle(hsm, keys, destroy_guard=destroy_guard(rotations))
        KeyAdministration(hsm, keys).create_key(
            "widget-kek", "widget", KeyPurpose.KEY_ENCRYPTION, Algorithm.AES_256, None
        )
        self.devices = SqliteDeviceRepository(db)
        self.devices.add_many([_device(n) for n in range(1234)])
        service = KekRotationService(hsm, keys, rotations, lifecycle, self.log)
        self.runner = KekRotationRunner(service, interval=0.05, batch=100)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add_kek_rotation(self.server, service, self.runner.wake)
        pki = state_dir / "pki"
        credentials = grpc.ssl_server_credentials(
            [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
            root_certificates=(pki / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()
        self.runner.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait()
        self.runner.stop()
        self.log.close()
        self.db.close()


def _device(n: int) -> Device:
    return Device(
        device_id=f"dev-{n:04d}",
        product="widget",
        chip="esp32c3",
        state=DeviceState.ACTIVE,
        secret=WrappedSecret("widget-kek", 1, "CKM_AES_KEY_WRAP(0x2109)/RFC3394", bytes([n % 256]) * 40),
        fingerprint=n.to_bytes(32, "big"),
        registered_by="factory",
        registered_at=T0,
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    running = Served(tmp_path / ".kms")
    yield running
    running.stop()


def _kmsctl(served: Served, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    connection = ["--server", f"127.0.0.1:{served.port}", "--state-dir", str(served.state_dir)]
    capsys.readouterr()
    code = kmsctl_cli.main(["kek", *args, *connection])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_before_any_rotation_is_not_found(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = _kmsctl(served, capsys, "status", "--product", "widget")
    assert code == kmsctl_cli.EXIT_NOT_FOUND and "no rotation job" in err


def test_rotate_wait_draws_progress_and_finishes(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _kmsctl(served, capsys, "rotate", "--product", "widget", "--wait", "--interval", "0.01")
    assert code == 0, err
    assert "rewrap [" in err and "1234/1234" in err
    assert "keys/widget-kek rotated to keys/widget-kek/versions/2: finished, 1234" in out
    code, out, _err = _kmsctl(served, capsys, "status", "--product", "widget", "--json")
    status = json.loads(out)
    assert code == 0 and status["finished"] and status["rewrapped"] == 1234 and status["remaining"] == 0
    assert status["from_version"] == "keys/widget-kek/versions/1"
    assert served.devices.count_under("widget-kek", 2) == 1234
    code, _out, err = _kmsctl(served, capsys, "status", "--product", "ghost")
    assert code == kmsctl_cli.EXIT_NOT_FOUND


def test_rotate_json_returns_at_once(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    served.runner.stop()  # nothing rewraps: the job stays running
    code, out, _err = _kmsctl(served, capsys, "rotate", "--product", "widget", "--json")
    job = json.loads(out)
    assert code == 0 and not job["finished"] and job["remaining"] == 1234 and job["total"] == 1234
    code, _out, err = _kmsctl(served, capsys, "rotate", "--product", "widget")
    assert code == kmsctl_cli.EXIT_PRECONDITION and "still running" in err
