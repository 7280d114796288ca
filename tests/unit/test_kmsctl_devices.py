"""``kmsctl devices`` and ``kmsctl payload``, run as real subprocesses against the fake KMS over mutual TLS,
with a dev PKI holding one client certificate per role (each from its own throwaway CA)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsapi.v1 import devices_pb2
from kmsctl.device.esp_encrypted_img import device_public_key_der, efuse_hmac_from_secret
from tests.support import fake_kms
from tests.support.fake_kms import THERMOSTAT_RELEASE, FakeKms, RunningServer
from tests.support.pki_for_tests import ThrowawayPki, make_pki

ROLES = ("factory-registrar", "security-officer", "distribution-server")


@pytest.fixture(scope="module")
def pkis() -> dict[str, ThrowawayPki]:
    return {role: make_pki(client_identity=role) for role in ROLES}


def run_kmsctl(
    work: Path, *args: str, server: RunningServer | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("KMSCTL_") and key != "KMS_STATE_DIR"
    }
    if server is not None:
        environment["KMSCTL_SERVER"] = f"localhost:{server.port}"
    return subprocess.run(
        [sys.executable, "-m", "kmsctl", *args],
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Kmsctl:
    """kmsctl in ``work`` against ``server``, whose dev PKI (./.kms) holds the certificate of one role only,
    so a command finds its files only when it picks that role by default."""

    def __init__(self, work: Path, server: RunningServer) -> None:
        self.work = work
        self.server = server
        self.fake = server.fake

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_kmsctl(self.work, *args, server=self.server)

    def json(self, *args: str) -> tuple[int, Any]:
        result = self(*args, "--json")
        return result.returncode, json.loads(result.stdout)


@pytest.fixture
def as_role(tmp_path: Path, pkis: dict[str, ThrowawayPki]) -> Iterator[Callable[[str], Kmsctl]]:
    started: list[RunningServer] = []

    def start(role: str) -> Kmsctl:
        pki = pkis[role]
        running = fake_kms.start(FakeKms(), pki)
        started.append(running)
        pki.write_state_dir(tmp_path / role / ".kms", role)
        return Kmsctl(tmp_path / role, running)

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def kmsctl(as_role: Callable[[str], Kmsctl]) -> Kmsctl:
    return as_role("factory-registrar")


@pytest.fixture
def fake(kmsctl: Kmsctl) -> FakeKms:
    return kmsctl.fake


@pytest.fixture
def work(kmsctl: Kmsctl) -> Path:
    return kmsctl.work


@pytest.fixture
def distributor(as_role: Callable[[str], Kmsctl]) -> Kmsctl:
    return as_role("distribution-server")


def secret_of(device_id: str) -> bytes:
    return hashlib.sha256(b"secret of " + device_id.encode()).digest()


def write_csv(path: Path, lines: list[str], header: str = "device_id,chip,secret") -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


def csv_rows(count: int, prefix: str = "dev") -> list[str]:
    return [f"{prefix}-{n},esp32s3,{secret_of(f'{prefix}-{n}').hex()}" for n in range(count)]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kmsctl: error: ")
    return lines[0]


# -- help ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "identity"),
    [
        (["devices", "register"], "factory-registrar"),
        (["devices", "show"], "factory-registrar"),
        (["devices", "revoke"], "security-officer"),
        (["payload", "get"], "distribution-server"),
        (["devices", "new-secret"], None),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else str(value),
)
def test_help_names_the_default_identity(command: list[str], identity: str | None, tmp_path: Path) -> None:
    result = run_kmsctl(tmp_path, *command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: kmsctl {' '.join(command)}")
    assert "exit codes:" in result.stdout
    if identity is None:
        assert "--server" not in result.stdout, "new-secret works offline"
    else:
        assert f"default --identity: {identity}" in result.stdout


# -- new-secret ------------------------------------------------------------------------------------------


def test_new_secret_writes_32_private_bytes_and_never_overwrites(tmp_path: Path) -> None:
    result = run_kmsctl(tmp_path, "devices", "new-secret", "-o", "key.bin")
    assert result.returncode == 0, result.stderr
    key = tmp_path / "key.bin"
    secret = key.read_bytes()
    assert len(secret) == 32 and secret != bytes(32)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "espefuse burn-key BLOCK_KEYn key.bin HMAC_UP" in result.stdout
    assert secret.hex() not in result.stdout

    again = run_kmsctl(tmp_path, "devices", "new-secret", "-o", "key.bin")
    assert again.returncode == 3
    assert "key.bin exists; kmsctl never overwrites a secret" in one_error_line(again)
    assert key.read_bytes() == secret


def test_new_secret_prints_the_ecies_public_key_the_device_derives(tmp_path: Path) -> None:
    result = run_kmsctl(tmp_path, "devices", "new-secret", "-o", "key.bin", "--ecies", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    secret = (tmp_path / "key.bin").read_bytes()
    assert set(data) == {"output", "size", "mode", "ecies_public_key"}
    key = serialization.load_der_public_key(device_public_key_der(efuse_hmac_from_secret(secret)))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    point = key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert data["ecies_public_key"] == point[1:].hex()
    assert secret.hex() not in result.stdout


# -- register --------------------------------------------------------------------------------------------


def test_register_a_csv_with_wrapped_secrets(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    (work / "keys").mkdir()
    (work / "keys" / "dev-x.bin").write_bytes(secret_of("dev-x"))
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    write_csv(
        work / "devices.csv",
        [
            f"dev-0,esp32s3,{secret_of('dev-0').hex()},,",
            f"dev-1,ESP32-C6,{secret_of('dev-1').hex().upper()},,{point.hex()}",
            "dev-x,esp32s3,,keys/dev-x.bin,",
        ],
        header="device_id,chip,secret,secret_file,ecies_public_key",
    )

    result = kmsctl("devices", "register", "--product", "thermostat", "--csv", "devices.csv")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "secrets wrapped for keys/thermostat-transport/versions/1" in result.stdout
    assert "created         3" in result.stdout
    assert {device_id: device.secret for device_id, device in fake.devices.items()} == {
        name: secret_of(name) for name in ("dev-0", "dev-1", "dev-x")
    }
    assert fake.devices["dev-1"].chip == "esp32c6"
    assert fake.devices["dev-1"].ecies_public_key == point
    assert [(row.row, len(row.secret)) for row in fake.wire_rows] == [(2, 40), (3, 40), (4, 40)]
    assert fake.identities == ["factory-registrar"] * 2, "GetRegistrationKey, RegisterDevices"
    assert not (work / "devices.csv.kmsctl-progress").exists()


def test_register_jsonl_plain_with_json_output(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    lines = [
        json.dumps({"device_id": f"j-{n}", "chip": "esp32c3", "secret": secret_of(f"j-{n}").hex()})
        for n in range(3)
    ]
    (work / "devices.jsonl").write_text("\n".join(lines) + "\n")

    code, data = kmsctl.json(
        "devices", "register", "--product", "thermostat", "--jsonl", "devices.jsonl", "--plain-secrets"
    )

    assert code == 0
    assert data == {
        "product": "thermostat",
        "input": "devices.jsonl",
        "transport": "plain",
        "transport_key_version": "",
        "created": 3,
        "unchanged": 0,
        "reprovisioned": 0,
        "rejected_count": 0,
        "invalid": 0,
        "conflicts": 0,
        "rejected": [],
        "resumed_after_row": 0,
    }
    assert [row.secret for row in fake.wire_rows] == [secret_of(f"j-{n}") for n in range(3)]
    assert "RegisterDevices" in fake.calls and "GetRegistrationKey" not in fake.calls


def test_malformed_csv_rows_are_reported_by_row_and_not_sent(
    kmsctl: Kmsctl, fake: FakeKms, work: Path
) -> None:
    good = secret_of("x").hex()
    write_csv(
        work / "devices.csv",
        [
            f"ok-1,esp32s3,{good},",
            f"bad hex,esp32s3,{good},",  # row 3: space in the id
            "short,esp32s3,abcd,",  # row 4
            "",  # row 5: blank, skipped
            f"both,esp32s3,{good},key.bin",  # row 6
            "nofile,esp32s3,,missing.bin",  # row 7
            f"ok-2,esp32s3,{good[:-2]}zz,",  # row 8: not hex
            "fields,esp32s3",  # row 9: too few fields
            f"ok-3,,{good},",  # row 10: no chip
            f"ok-4,esp32s3,{secret_of('ok-4').hex()},",  # row 11
        ],
        header="device_id,chip,secret,secret_file",
    )

    result = kmsctl("devices", "register", "--product", "thermostat", "--csv", "devices.csv")

    assert result.returncode == 3
    assert "created         2" in result.stdout
    assert "rejected        7 (7 invalid, 0 already registered)" in result.stdout
    problems = result.stderr.splitlines()
    assert problems == [
        "kmsctl: row 3 (bad hex): INVALID_ARGUMENT: malformed device id 'bad hex': use 1-64 printable "
        "ASCII characters, no spaces",
        "kmsctl: row 4 (short): INVALID_ARGUMENT: secret must be 64 hexadecimal characters (32 bytes), not 4",
        "kmsctl: row 6 (both): INVALID_ARGUMENT: give secret or secret_file, not both",
        "kmsctl: row 7 (nofile): INVALID_ARGUMENT: secret_file missing.bin: No such file or directory",
        "kmsctl: row 8 (ok-2): INVALID_ARGUMENT: secret is not hexadecimal",
        "kmsctl: row 9 (fields): INVALID_ARGUMENT: 2 fields, the header has 4",
        "kmsctl: row 10 (ok-3): INVALID_ARGUMENT: chip is missing",
    ]
    assert [row.device_id for row in fake.wire_rows] == ["ok-1", "ok-4"]
    assert [row.row for row in fake.wire_rows] == [2, 11]


def test_malformed_jsonl_rows_are_reported_by_line(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    secret = secret_of("x").hex()
    (work / "devices.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"device_id": "ok", "chip": "esp32s3", "secret": secret}),
                "{not json",
                "",
                '["a list"]',
                json.dumps({"device_id": "extra", "chip": "esp32s3", "secret": secret, "serial": "7"}),
                json.dumps({"device_id": "number", "chip": "esp32s3", "secret": 7}),
            ]
        )
        + "\n"
    )
    code, data = kmsctl.json("devices", "register", "--product", "thermostat", "--jsonl", "devices.jsonl")
    assert code == 3
    assert data["created"] == 1 and data["invalid"] == 4
    assert [(entry["row"], entry["device_id"], entry["code"]) for entry in data["rejected"]] == [
        (2, "", "INVALID_ARGUMENT"),
        (4, "", "INVALID_ARGUMENT"),
        (5, "extra", "INVALID_ARGUMENT"),
        (6, "number", "INVALID_ARGUMENT"),
    ]
    assert data["rejected"][0]["message"].startswith("not JSON")
    assert data["rejected"][1]["message"] == "not a JSON object"
    assert data["rejected"][2]["message"].startswith("unknown field 'serial'")
    assert data["rejected"][3]["message"] == "secret must be a string"
    assert [row.device_id for row in fake.wire_rows] == ["ok"]


@pytest.mark.parametrize(
    ("lines", "exit_code", "invalid", "conflicts"),
    [
        (["taken,esp32s3,{other}"], 5, 0, 1),
        (["taken,esp32s3,{other}", "fresh,esp99,{secret}"], 3, 1, 1),
        (["taken,esp32s3,{same}", "fresh,esp32s3,{secret}"], 0, 0, 0),
    ],
    ids=["conflict", "conflict-and-invalid", "unchanged"],
)
def test_server_rejections_set_the_exit_code(
    kmsctl: Kmsctl, fake: FakeKms, work: Path, lines: list[str], exit_code: int, invalid: int, conflicts: int
) -> None:
    fake.devices["taken"] = fake_kms.FakeDevice("taken", "thermostat", "esp32s3", secret_of("taken"))
    values = {"other": bytes(32).hex(), "same": secret_of("taken").hex(), "secret": secret_of("fresh").hex()}
    write_csv(work / "devices.csv", [line.format(**values) for line in lines])
    code, data = kmsctl.json("devices", "register", "--product", "thermostat", "--csv", "devices.csv")
    assert code == exit_code
    assert (data["invalid"], data["conflicts"]) == (invalid, conflicts)
    if conflicts:
        assert data["rejected"][0] == {
            "row": 2,
            "device_id": "taken",
            "code": "ALREADY_EXISTS",
            "message": "device taken is registered with another secret",
        }
    if not exit_code:
        assert (data["created"], data["unchanged"]) == (1, 1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the CSV file is empty"),
        ("device_id,chip,secret,serial\n", "unknown CSV column 'serial'"),
        ("device_id,secret\n", "no chip column"),
        ("device_id,chip\n", "neither a secret nor a secret_file column"),
    ],
)
def test_an_unusable_csv_header_exits_3_before_connecting(
    kmsctl: Kmsctl, fake: FakeKms, work: Path, content: str, message: str
) -> None:
    (work / "devices.csv").write_text(content)
    result = kmsctl("devices", "register", "--product", "thermostat", "--csv", "devices.csv")
    assert result.returncode == 3
    assert message in one_error_line(result)
    assert fake.calls == []


def test_an_unreadable_or_missing_input_exits_3(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    (work / "devices.csv").write_bytes(b"device_id,chip,secret\n" + b"\xff\xfe garbage\n" * 3)
    result = kmsctl("devices", "register", "--product", "thermostat", "--csv", "devices.csv")
    assert result.returncode == 3
    assert "devices.csv: not a readable CSV text file" in one_error_line(result)
    assert fake.wire_rows == []

    result = kmsctl("devices", "register", "--product", "thermostat", "--jsonl", "missing.jsonl")
    assert result.returncode == 3
    assert one_error_line(result) == "kmsctl: error: missing.jsonl: No such file or directory"


def test_an_interrupted_registration_resumes_from_its_state_file(
    kmsctl: Kmsctl, fake: FakeKms, work: Path
) -> None:
    rows = csv_rows(35)
    rows[3] = "dev-3,esp32s3,beef"  # row 5: malformed
    write_csv(work / "devices.csv", rows)
    state_file = work / "devices.csv.kmsctl-progress"
    fake.register_break_after = [2]  # message 2 (rows 12-21) committed, not acknowledged; then UNAVAILABLE

    args = ["devices", "register", "--product", "thermostat", "--csv", "devices.csv", "--batch-size", "10"]
    first = kmsctl(*args, "--retries", "0")

    assert first.returncode == 7
    assert one_error_line(first).endswith(
        f"registry connection lost (fake); progress saved in {state_file.name}: "
        "run again to resume after row 12"
    )
    state = json.loads(state_file.read_text())
    assert (state["last_row"], state["created"], state["invalid"]) == (12, 10, 1)

    code, data = kmsctl.json(*args)

    assert code == 3, "the malformed row of the first run still counts"
    assert data["resumed_after_row"] == 12
    assert (data["created"], data["unchanged"], data["invalid"]) == (24, 10, 1)
    assert [entry["row"] for entry in data["rejected"]] == [5]
    second_run = [row.row for row in fake.wire_rows][20:]
    assert second_run == list(range(13, 37)), "the second run starts after the acknowledged rows"
    assert len(fake.devices) == 34
    assert not state_file.exists()


def test_a_state_file_of_another_input_is_refused(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    write_csv(work / "devices.csv", csv_rows(30))
    fake.register_break_after = [2]
    args = ["devices", "register", "--product", "thermostat", "--csv", "devices.csv", "--batch-size", "10"]
    assert kmsctl(*args, "--retries", "0", "--state-file", "progress.json").returncode == 7
    assert (work / "progress.json").exists()

    write_csv(work / "devices.csv", csv_rows(31))
    result = kmsctl(*args, "--state-file", "progress.json")
    assert result.returncode == 3
    assert "progress.json records the progress of another registration" in one_error_line(result)

    (work / "progress.json").write_text("{not json")
    result = kmsctl(*args, "--state-file", "progress.json")
    assert result.returncode == 3
    assert "is not a kmsctl progress file" in one_error_line(result)


def test_register_with_an_unknown_product_exits_4(kmsctl: Kmsctl, work: Path) -> None:
    write_csv(work / "devices.csv", csv_rows(1))
    result = kmsctl("devices", "register", "--product", "toaster", "--csv", "devices.csv")
    assert result.returncode == 4
    assert one_error_line(result) == "kmsctl: error: unknown product 'toaster'"


REGISTER_40 = ["devices", "register", "--product", "thermostat", "--csv", "devices.csv", "--batch-size", "10"]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_register_shows_progress_when_stderr_is_a_terminal(kmsctl: Kmsctl, work: Path) -> None:
    import fcntl
    import struct
    import termios

    write_csv(work / "devices.csv", csv_rows(40))
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("KMSCTL_")}
    environment["KMSCTL_SERVER"] = f"localhost:{kmsctl.server.port}"
    try:
        process = subprocess.run(
            [sys.executable, "-m", "kmsctl", *REGISTER_40],
            cwd=work,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=terminal,
            timeout=60,
            check=False,
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                block = os.read(controller, 4096)
            except OSError:
                break
            if not block:
                break
            shown += block
    finally:
        os.close(controller)
    assert process.returncode == 0
    assert b"register devices.csv" in shown and b"/40 " in shown, "the rows are counted up front"


# -- show and revoke -------------------------------------------------------------------------------------


def test_show_uses_the_factory_registrar_identity(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    fake.add_device("24:6f:28:aa:bb:cc", ecies=True)

    result = kmsctl("devices", "show", "24:6f:28:aa:bb:cc")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "device 24:6f:28:aa:bb:cc"
    assert "state           active" in result.stdout and "ecies key       yes" in result.stdout
    assert fake.identities == ["factory-registrar"]

    result = kmsctl("devices", "show", "24:6f:28:aa:bb:cc", "--identity", "auditor")
    assert result.returncode == 3 and "auditor.pem not found" in one_error_line(result)
    (work / ".kms" / "pki" / "clients" / "factory-registrar.pem").rename(work / "elsewhere.pem")
    result = kmsctl("devices", "show", "24:6f:28:aa:bb:cc", "--cert", "elsewhere.pem")
    assert result.returncode == 0, result.stderr


def test_revoke_uses_the_security_officer_identity(as_role: Callable[[str], Kmsctl]) -> None:
    officer = as_role("security-officer")
    officer.fake.add_device("24:6f:28:aa:bb:cc", ecies=True)

    code, data = officer.json("devices", "revoke", "24:6f:28:aa:bb:cc")

    assert code == 0
    assert data == {
        "device_id": "24:6f:28:aa:bb:cc",
        "product": "thermostat",
        "chip": "esp32s3",
        "state": "revoked",
        "kek_version": "keys/thermostat-kek/versions/1",
        "has_ecies_public_key": True,
        "registered_by": "factory-registrar",
        "register_time": "2025-03-04T05:06:07+00:00",
        "secret_generation": 1,
        "reprovision_until": None,
        "secret_registered_by": "factory-registrar",
        "secret_register_time": "2025-03-04T05:06:07+00:00",
        "reprovisioned_under": "",
    }
    assert officer.fake.identities == ["security-officer"]
    result = officer("devices", "revoke", "24:6f:28:aa:bb:cc")
    assert result.returncode == 0 and result.stdout.startswith("revoked device 24:6f:28:aa:bb:cc")


def test_show_an_unknown_device_exits_4(kmsctl: Kmsctl) -> None:
    result = kmsctl("devices", "show", "nope")
    assert result.returncode == 4
    assert one_error_line(result) == "kmsctl: error: no device 'nope'"


# -- payload get -----------------------------------------------------------------------------------------


def expected_payload(
    device_id: str, payload_format: int = devices_pb2.FKSP_V1, segment_size: int = 4096
) -> bytes:
    return fake_kms.payload_bytes(device_id, THERMOSTAT_RELEASE, payload_format, segment_size)


def test_payload_get_writes_the_payload(distributor: Kmsctl) -> None:
    kmsctl, fake, work = distributor, distributor.fake, distributor.work
    fake.add_device("d1")
    fake.payload_break_after = [1]  # resumed automatically

    result = kmsctl("payload", "get", "--device", "d1", "--release", THERMOSTAT_RELEASE, "-o", "d1.fksp")

    assert result.returncode == 0, result.stderr
    assert (work / "d1.fksp").read_bytes() == expected_payload("d1")
    assert not (work / "d1.fksp.part").exists()
    assert f"wrote the fksp payload of {THERMOSTAT_RELEASE} for device d1 to d1.fksp" in result.stdout
    assert fake.identities == ["distribution-server", "distribution-server"]
    assert [request.offset for request in fake.payload_requests] == [0, fake_kms.PAYLOAD_CHUNK]


def test_payload_get_json_and_options(distributor: Kmsctl) -> None:
    kmsctl, fake, work = distributor, distributor.fake, distributor.work
    fake.add_device("d1", ecies=True)
    code, data = kmsctl.json(
        "payload",
        "get",
        "--device",
        "d1",
        "--release",
        THERMOSTAT_RELEASE.removeprefix("releases/"),
        "--segment-size",
        "1024",
        "--device-secure-version",
        "3",
        "-o",
        "d1.fksp",
    )
    assert code == 0
    payload = expected_payload("d1", segment_size=1024)
    assert (work / "d1.fksp").read_bytes() == payload
    assert data["total_size"] == len(payload) and data["segment_size"] == 1024
    assert (data["format"], data["release"], data["output"], data["resumed_from"]) == (
        "fksp",
        THERMOSTAT_RELEASE,
        "d1.fksp",
        0,
    )
    assert fake.payload_requests[-1].device_secure_version == 3

    result = kmsctl("payload", "get", "--device", "d1", "--release", THERMOSTAT_RELEASE)
    assert result.returncode == 2, "-o is required"
    result = kmsctl(
        "payload",
        "get",
        "--device",
        "d1",
        "--release",
        THERMOSTAT_RELEASE,
        "--format",
        "esp-encrypted-img",
        "-o",
        "d1.img",
    )
    assert result.returncode == 0, result.stderr
    assert (work / "d1.img").read_bytes() == expected_payload("d1", devices_pb2.ESP_ENCRYPTED_IMG_ECIES, 0)


def test_an_interrupted_payload_get_resumes_from_its_part_file(distributor: Kmsctl) -> None:
    kmsctl, fake, work = distributor, distributor.fake, distributor.work
    fake.add_device("d1")
    (work / "d1.fksp.part").write_bytes(expected_payload("d1")[:100_000])

    result = kmsctl("payload", "get", "--device", "d1", "--release", THERMOSTAT_RELEASE, "-o", "d1.fksp")

    assert result.returncode == 0, result.stderr
    assert "(resumed at byte 100000)" in result.stdout
    assert (work / "d1.fksp").read_bytes() == expected_payload("d1")
    assert [request.offset for request in fake.payload_requests] == [100_000 - 4096]


@pytest.mark.parametrize(
    ("setup", "release", "exit_code", "message"),
    [
        ("revoke", THERMOSTAT_RELEASE, 5, "device d1 is revoked"),
        ("", "releases/" + "00" * 32, 4, "no release"),
        ("payload-device", THERMOSTAT_RELEASE, 8, "sealed for device 'someone-else'"),
    ],
)
def test_payload_get_failures(
    distributor: Kmsctl, setup: str, release: str, exit_code: int, message: str
) -> None:
    kmsctl, fake, work = distributor, distributor.fake, distributor.work
    fake.add_device("d1")
    if setup == "revoke":
        fake.devices["d1"].state = "revoked"
    elif setup:
        fake.tamper = setup  # type: ignore[assignment]
    result = kmsctl("payload", "get", "--device", "d1", "--release", release, "-o", "d1.fksp")
    assert result.returncode == exit_code
    assert message in one_error_line(result)
    assert not (work / "d1.fksp").exists() and not (work / "d1.fksp.part").exists()
