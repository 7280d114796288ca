"""The ``kmsctl`` command, run as a real subprocess against the fake KMS over mutual TLS."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from kmsctl import sbv2_key_digest
from kmsctl.cli import main
from tests.support import fake_kms
from tests.support.fake_kms import FakeKms, RunningServer, signed_image
from tests.support.pki_for_tests import ThrowawayPki, make_pki

IMAGE = bytes(range(256)) * 1500  # 384000 bytes: 3 upload chunks


@pytest.fixture(scope="module")
def pki() -> ThrowawayPki:
    return make_pki()


@pytest.fixture
def served(pki: ThrowawayPki) -> Iterator[RunningServer]:
    running = fake_kms.start(FakeKms(), pki)
    yield running
    running.stop()


@pytest.fixture
def fake(served: RunningServer) -> FakeKms:
    return served.fake


@pytest.fixture
def work(tmp_path: Path, pki: ThrowawayPki) -> Path:
    """A working directory with the dev PKI laid out under ./.kms, as ``kms init`` would leave it."""
    pki.write_state_dir(tmp_path / ".kms")
    (tmp_path / "app.bin").write_bytes(IMAGE)
    return tmp_path


class Kmsctl:
    def __init__(self, work: Path, server: RunningServer) -> None:
        self.work = work
        self.server = server

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("KMSCTL_") and key != "KMS_STATE_DIR"
        }
        environment["KMSCTL_SERVER"] = f"localhost:{self.server.port}"
        environment.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "kmsctl", *args],
            cwd=self.work,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def json(self, *args: str) -> tuple[int, Any]:
        result = self(*args, "--json")
        return result.returncode, json.loads(result.stdout)


@pytest.fixture
def kmsctl(work: Path, served: RunningServer) -> Kmsctl:
    return Kmsctl(work, served)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kmsctl: error: ")
    return lines[0]


def no_temp_files(directory: Path) -> bool:
    return not any(path.name.endswith(".tmp") for path in directory.iterdir())


# -- help and usage --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[], ["sign"], ["sign-digest"], ["public-key"], ["efuse-digest"], ["keys"], ["keys", "list"]],
    ids=lambda command: " ".join(command) or "kmsctl",
)
def test_help_works_for_every_command(command: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmsctl", *command, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: kmsctl {' '.join(command)}".rstrip())
    if command not in ([], ["keys"]):
        assert "--server HOST:PORT" in result.stdout
    if command != ["keys"]:
        assert "exit codes:" in result.stdout and "8  integrity check failed" in result.stdout


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("kmsctl")
    if not script.exists():
        pytest.skip("kmsctl console script not installed next to this interpreter")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("kmsctl ")


@pytest.mark.parametrize(
    "args",
    [[], ["sign", "app.bin"], ["sign-digest", "--key", "k", "-o", "s"], ["frobnicate"], ["sign", "--bogus"]],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kmsctl", *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "usage: kmsctl" in result.stderr


def test_main_returns_exit_codes_in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRPC_VERBOSITY", "ERROR")  # main() would otherwise set it for this process
    assert main(["--version"]) == 0
    assert main(["sign"]) == 2
    capsys.readouterr()


# -- sign ------------------------------------------------------------------------------------------------


def test_sign_writes_the_signed_image_and_prints_a_summary(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    result = kmsctl("sign", "app.bin", "--product", "thermostat", "-o", "signed.bin")

    assert result.returncode == 0, result.stderr
    assert (work / "signed.bin").read_bytes() == signed_image(IMAGE)
    assert no_temp_files(work)
    output_sha256 = hashlib.sha256(signed_image(IMAGE)).hexdigest()
    for expected in (
        f"releases/{output_sha256}",
        "esp32s3",
        "1.2.3",
        "secure_version  4",
        "keys/thermostat-sb0/versions/2, keys/thermostat-sb1/versions/1",
        output_sha256,
    ):
        assert expected in result.stdout
    assert result.stderr == "", "no progress bar when stderr is not a terminal"
    assert fake.identities == ["build-server"], "the dev PKI client certificate was used"
    assert fake.chunk_sizes == [262144, 121856]


def test_sign_json_prints_the_release_fields(kmsctl: Kmsctl, work: Path) -> None:
    code, data = kmsctl.json("sign", "app.bin", "--product", "thermostat", "-o", "out/signed.bin")
    assert code == 3 and data["error"]["code"] == "OS_ERROR", "the output directory does not exist"

    (work / "out").mkdir()
    code, data = kmsctl.json("sign", "app.bin", "--product", "thermostat", "-o", "out/signed.bin")
    assert code == 0
    assert data["output"] == "out/signed.bin"
    assert data["output_sha256"] == hashlib.sha256(signed_image(IMAGE)).hexdigest()
    assert data["input_sha256"] == hashlib.sha256(IMAGE).hexdigest()
    assert data["output_size"] == len(signed_image(IMAGE))
    assert data["key_versions"] == ["keys/thermostat-sb0/versions/2", "keys/thermostat-sb1/versions/1"]
    assert (data["chip"], data["version"], data["secure_version"]) == ("esp32s3", "1.2.3", 4)
    assert data["create_time"] == "2025-01-02T03:04:05+00:00"
    assert data["reused"] is False


def test_sign_quiet_prints_nothing(kmsctl: Kmsctl) -> None:
    result = kmsctl("sign", "app.bin", "--product", "thermostat", "-o", "signed.bin", "-q")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_sign_shows_upload_progress_when_stderr_is_a_terminal(kmsctl: Kmsctl, work: Path) -> None:
    import fcntl
    import struct
    import termios

    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # tqdm draws nothing at 0x0
    environment = {key: value for key, value in os.environ.items() if not key.startswith("KMSCTL_")}
    environment["KMSCTL_SERVER"] = f"localhost:{kmsctl.server.port}"
    try:
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "kmsctl",
                "sign",
                "app.bin",
                "--product",
                "thermostat",
                "-o",
                "signed.bin",
            ],
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
            except OSError:  # EIO once the terminal side is closed and drained
                break
            if not block:
                break
            shown += block
    finally:
        os.close(controller)
    assert process.returncode == 0
    assert b"upload app.bin" in shown
    assert b"signed app.bin for product thermostat" in process.stdout


def test_a_tampered_image_exits_8_and_keeps_the_previous_output(
    kmsctl: Kmsctl, fake: FakeKms, work: Path
) -> None:
    fake.tamper = "flip-byte"
    (work / "signed.bin").write_bytes(b"previous")

    result = kmsctl("sign", "app.bin", "--product", "thermostat", "-o", "signed.bin")
    assert result.returncode == 8
    assert "does not match its release" in one_error_line(result)

    code, data = kmsctl.json("sign", "app.bin", "--product", "thermostat", "-o", "signed.bin")
    assert code == 8
    assert data["error"]["code"] == "DATA_LOSS" and data["error"]["exit_code"] == 8
    assert (work / "signed.bin").read_bytes() == b"previous"
    assert no_temp_files(work)


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 3),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 3),
        (grpc.StatusCode.NOT_FOUND, 4),
        (grpc.StatusCode.FAILED_PRECONDITION, 5),
        (grpc.StatusCode.PERMISSION_DENIED, 6),
        (grpc.StatusCode.UNAUTHENTICATED, 6),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 7),
        (grpc.StatusCode.DATA_LOSS, 8),
        (grpc.StatusCode.INTERNAL, 1),
    ],
)
def test_server_statuses_become_exit_codes(
    kmsctl: Kmsctl, fake: FakeKms, work: Path, status: grpc.StatusCode, exit_code: int
) -> None:
    fake.abort_with = (status, "secure_version 4 is below the anti-rollback floor 5")
    result = kmsctl("sign", "app.bin", "--product", "thermostat", "-o", "signed.bin")
    assert result.returncode == exit_code
    assert one_error_line(result) == "kmsctl: error: secure_version 4 is below the anti-rollback floor 5"
    assert not (work / "signed.bin").exists()
    assert no_temp_files(work)


def test_unknown_product_exits_4(kmsctl: Kmsctl) -> None:
    code, data = kmsctl.json("sign", "app.bin", "--product", "toaster", "-o", "signed.bin")
    assert code == 4
    assert data == {"error": {"code": "NOT_FOUND", "message": "unknown product 'toaster'", "exit_code": 4}}


def test_a_missing_image_exits_3(kmsctl: Kmsctl, fake: FakeKms) -> None:
    result = kmsctl("sign", "missing.bin", "--product", "thermostat", "-o", "signed.bin")
    assert result.returncode == 3
    assert one_error_line(result) == "kmsctl: error: missing.bin: No such file or directory"
    assert fake.calls == []


def test_unavailable_is_retried_then_succeeds(kmsctl: Kmsctl, fake: FakeKms) -> None:
    fake.fail_unavailable = 1
    result = kmsctl("sign", "app.bin", "--product", "thermostat", "-o", "signed.bin")
    assert result.returncode == 0, result.stderr
    assert fake.calls == ["SignImage", "SignImage"]


def test_unavailable_after_retries_exits_7(kmsctl: Kmsctl, fake: FakeKms) -> None:
    fake.fail_unavailable = 10
    result = kmsctl("keys", "list", "--retries", "1")
    assert result.returncode == 7
    assert "HSM unreachable (fake) (after 2 attempts)" in one_error_line(result)
    assert fake.calls == ["ListKeys"] * 2


def test_deadline_exceeded_exits_7(kmsctl: Kmsctl, fake: FakeKms) -> None:
    fake.delay = 2.0
    result = kmsctl("keys", "list", "--timeout", "0.3")
    assert result.returncode == 7
    assert fake.calls == ["ListKeys"]


def test_no_server_exits_7(kmsctl: Kmsctl, work: Path) -> None:
    kmsctl.server.stop()
    result = kmsctl("keys", "list", "--retries", "0")
    assert result.returncode == 7
    one_error_line(result)


# -- connection options ----------------------------------------------------------------------------------


def test_missing_dev_pki_exits_3_with_a_hint(kmsctl: Kmsctl, tmp_path: Path) -> None:
    result = kmsctl("keys", "list", "--state-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 3
    assert "--state-dir" in one_error_line(result)
    result = kmsctl("keys", "list", "--identity", "release-manager")
    assert "release-manager.pem not found" in one_error_line(result)


def test_explicit_files_from_the_environment(kmsctl: Kmsctl, work: Path) -> None:
    (work / ".kms").rename(work / "elsewhere")
    clients = work / "elsewhere" / "pki" / "clients"
    env = {
        "KMSCTL_CA": str(work / "elsewhere" / "pki" / "ca.pem"),
        "KMSCTL_CERT": str(clients / "build-server.pem"),
        "KMSCTL_KEY": str(clients / "build-server.key"),
    }
    assert kmsctl("keys", "list", env=env).returncode == 0
    assert kmsctl("keys", "list", env={"KMS_STATE_DIR": str(work / "elsewhere")}).returncode == 0
    flags = ["--ca", env["KMSCTL_CA"], "--cert", env["KMSCTL_CERT"], "--tls-key", env["KMSCTL_KEY"]]
    assert kmsctl("keys", "list", *flags).returncode == 0


def test_a_server_with_a_certificate_from_another_ca_exits_7(kmsctl: Kmsctl, work: Path) -> None:
    make_pki().write_state_dir(work / "other")
    result = kmsctl("keys", "list", "--ca", str(work / "other" / "pki" / "ca.pem"), "--retries", "0")
    assert result.returncode == 7
    one_error_line(result)


def test_server_name_override(kmsctl: Kmsctl) -> None:
    target = f"127.0.0.1:{kmsctl.server.port}"
    assert kmsctl("keys", "list", "--server", target, "--server-name", "localhost").returncode == 0


# -- sign-digest -----------------------------------------------------------------------------------------


def verify(key_version: str, der: bytes, digest: bytes, algorithm: hashes.HashAlgorithm) -> None:
    key = fake_kms.private_key(key_version).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(der, digest, ec.ECDSA(utils.Prehashed(algorithm)))


def test_sign_digest_raw_and_der(kmsctl: Kmsctl, work: Path) -> None:
    digest = hashlib.sha256(b"bootloader").digest()

    result = kmsctl("sign-digest", "--key", "thermostat-sb0", "--sha256", digest.hex(), "-o", "sig.raw")
    assert result.returncode == 0, result.stderr
    assert "keys/thermostat-sb0/versions/2" in result.stdout
    raw = (work / "sig.raw").read_bytes()
    assert len(raw) == 64
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    verify("keys/thermostat-sb0/versions/2", utils.encode_dss_signature(r, s), digest, hashes.SHA256())

    code, data = kmsctl.json(
        "sign-digest",
        "--key",
        "keys/thermostat-sb0",
        "--sha256",
        digest.hex(),
        "--encoding",
        "der",
        "-o",
        "sig.der",
    )
    assert code == 0
    der = (work / "sig.der").read_bytes()
    assert base64.b64decode(data["signature"]) == der
    assert data["key_version"] == "keys/thermostat-sb0/versions/2"
    assert (data["algorithm"], data["encoding"], data["hash"]) == ("ecdsa-p256", "der", "sha256")
    verify(data["key_version"], der, digest, hashes.SHA256())


def test_sign_digest_of_a_file_uses_the_keys_hash(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    (work / "artifact.tar").write_bytes(b"an artifact" * 1000)
    code, data = kmsctl.json("sign-digest", "--key", "artifacts", "--file", "artifact.tar", "-o", "a.sig")
    assert code == 0
    digest = hashlib.sha384(b"an artifact" * 1000).digest()
    assert data["hash"] == "sha384" and data["digest"] == digest.hex()
    [request] = fake.digest_requests
    assert request.digest.sha384 == digest
    raw = (work / "a.sig").read_bytes()
    r, s = int.from_bytes(raw[:48], "big"), int.from_bytes(raw[48:], "big")
    verify(data["key_version"], utils.encode_dss_signature(r, s), digest, hashes.SHA384())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sha256", "xyz"], "--sha256 expects a hexadecimal digest"),
        (["--sha256", "00" * 31], "a sha256 digest is 32 bytes, not 31"),
        (["--sha384", "00" * 32], "a sha384 digest is 48 bytes, not 32"),
    ],
)
def test_sign_digest_bad_input_exits_3(kmsctl: Kmsctl, fake: FakeKms, args: list[str], message: str) -> None:
    result = kmsctl("sign-digest", "--key", "thermostat-sb0", *args, "-o", "sig")
    assert result.returncode == 3
    assert one_error_line(result) == f"kmsctl: error: {message}"
    assert fake.calls == []


def test_sign_digest_integrity_failure_exits_8_without_output(
    kmsctl: Kmsctl, fake: FakeKms, work: Path
) -> None:
    fake.tamper = "signature-crc"
    result = kmsctl("sign-digest", "--key", "thermostat-sb0", "--sha256", "00" * 32, "-o", "sig")
    assert result.returncode == 8
    assert not (work / "sig").exists()


# -- public keys -----------------------------------------------------------------------------------------


def test_public_key_to_stdout_file_and_json(kmsctl: Kmsctl, work: Path) -> None:
    pem = fake_kms.public_pem("keys/thermostat-sb0/versions/2")

    result = kmsctl("public-key", "thermostat-sb0", "-q")
    assert (result.returncode, result.stdout) == (0, pem)

    result = kmsctl("public-key", "keys/thermostat-sb0/versions/2", "-o", "pub.pem")
    assert result.returncode == 0
    assert (work / "pub.pem").read_text() == pem

    code, data = kmsctl.json("public-key", "thermostat-sb0")
    assert code == 0
    assert data["pem"] == pem and data["algorithm"] == "ecdsa-p256"
    assert data["sbv2_key_digest"] == sbv2_key_digest(pem).hex()


def test_public_key_of_an_unknown_key_exits_4(kmsctl: Kmsctl) -> None:
    result = kmsctl("public-key", "nope")
    assert result.returncode == 4
    assert one_error_line(result) == "kmsctl: error: no key 'keys/nope'"


def test_efuse_digest_writes_32_raw_bytes(kmsctl: Kmsctl, work: Path) -> None:
    result = kmsctl("efuse-digest", "thermostat-sb1", "-o", "digest.bin")
    assert result.returncode == 0, result.stderr
    expected = sbv2_key_digest(fake_kms.public_pem("keys/thermostat-sb1/versions/1"))
    assert (work / "digest.bin").read_bytes() == expected
    assert expected.hex() in result.stdout

    code, data = kmsctl.json("efuse-digest", "thermostat-sb1", "-o", "digest.bin")
    assert code == 0 and data["sbv2_key_digest"] == expected.hex()


def test_efuse_digest_refuses_a_wrong_server_digest(kmsctl: Kmsctl, fake: FakeKms, work: Path) -> None:
    fake.tamper = "sbv2-digest"
    result = kmsctl("efuse-digest", "thermostat-sb0", "-o", "digest.bin")
    assert result.returncode == 8
    assert "do not burn it" in one_error_line(result)
    assert not (work / "digest.bin").exists()


def test_keys_list_table_and_json(kmsctl: Kmsctl) -> None:
    result = kmsctl("keys", "list", "--product", "thermostat")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PRODUCT", "PURPOSE", "ALGORITHM", "SLOT", "PRIMARY", "VERSIONS"]
    assert lines[1].split() == [
        "keys/thermostat-sb0",
        "thermostat",
        "secure-boot-v2",
        "ecdsa-p256",
        "0",
        "2",
        "1:disabled",
        "2:enabled",
    ]
    assert len(lines) == 4

    code, data = kmsctl.json("keys", "list")
    assert code == 0
    assert [key["name"] for key in data["keys"]] == [
        "keys/thermostat-sb0",
        "keys/thermostat-sb1",
        "keys/artifacts",
        "keys/doorbell-sb0",
    ]
    artifacts = data["keys"][2]
    assert artifacts["sbv2_slot"] is None and artifacts["purpose"] == "digest-signing"
    assert artifacts["versions"] == [
        {"name": "keys/artifacts/versions/1", "state": "enabled", "create_time": "2025-01-01T00:00:00+00:00"}
    ]
