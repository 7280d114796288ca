"""The factory and distribution paths against a real server: registration, sealed payloads, resume.

Payloads are checked by the device references, not by our encoder: the Python device model (A/B flash,
manifest signature, anti-rollback) and, for esp_encrypted_img, the independent device-side decoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from kmsapi.v1 import devices_pb2, devices_pb2_grpc, keys_pb2, keys_pb2_grpc
from kmsctl.device import DeviceModel, Verdict
from kmsctl.device import esp_encrypted_img as device_esp
from tests.support.esp_images import build_app_image
from tests.support.kms_server import RunningKms, running_kms

PRODUCT = "fleet"
CHIP = "esp32c6"
CHIP_ID = 0x000D
ROOT = Path(__file__).resolve().parents[2]
Outcome = devices_pb2.RowOutcome


def _channel(server: RunningKms, role: str) -> grpc.Channel:
    files = server.credentials(role)
    creds = grpc.ssl_channel_credentials(*(files[k].read_bytes() for k in ("ca", "key", "cert")))
    return grpc.secure_channel(server.target, creds, options=[("grpc.max_receive_message_length", 4 << 20)])


def _register(
    server: RunningKms, rows: list[devices_pb2.DeviceRow], *, wrapped: bool = True, product: str = PRODUCT
) -> list[devices_pb2.RowOutcome]:
    """Register rows (secrets in plaintext in ``rows``) as a factory station would, in one message."""
    with _channel(server, "factory-registrar") as channel:
        stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        header = devices_pb2.RegisterDevicesHeader(product=product)
        if wrapped:
            key = stub.GetRegistrationKey(devices_pb2.GetRegistrationKeyRequest(product=product), timeout=30)
            public = serialization.load_pem_public_key(key.pem.encode())
            assert isinstance(public, rsa.RSAPublicKey)
            batch_key = os.urandom(32)
            oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
            header.transport_key_version = key.key_version
            header.wrapped_batch_key = public.encrypt(batch_key, oaep)
            rows = [_wrap(row, batch_key) for row in rows]

        def requests() -> Iterator[devices_pb2.RegisterDevicesRequest]:
            yield devices_pb2.RegisterDevicesRequest(header=header)
            yield devices_pb2.RegisterDevicesRequest(devices=devices_pb2.DeviceRows(rows=rows))

        responses = list(stub.RegisterDevices(requests(), timeout=60))
    assert len(responses) == 1
    return list(responses[0].outcomes)


def _wrap(row: devices_pb2.DeviceRow, batch_key: bytes) -> devices_pb2.DeviceRow:
    wrapped = devices_pb2.DeviceRow()
    wrapped.CopyFrom(row)
    if len(row.secret) == 32:
        wrapped.secret = aes_key_wrap(batch_key, row.secret)
    return wrapped


def _row(
    n: int, device_id: str, secret: bytes, chip: str = CHIP, ecies: bytes = b""
) -> devices_pb2.DeviceRow:
    return devices_pb2.DeviceRow(row=n, device_id=device_id, chip=chip, secret=secret, ecies_public_key=ecies)


def _release(
    server: RunningKms, secure_version: int = 30, seed: int = 0, size: int = 70_000
) -> tuple[str, bytes]:
    image = build_app_image(CHIP, size, secure_version=min(secure_version, 16), seed=seed)
    with server.client() as kms:
        signed = kms.sign_image(PRODUCT, image)
    assert signed.data is not None
    return signed.release.name, signed.data


def _payload(
    server: RunningKms,
    device_id: str,
    release: str,
    *,
    offset: int = 0,
    fmt: devices_pb2.PayloadFormat.ValueType = devices_pb2.FKSP_V1,
    **extra: int,
) -> tuple[devices_pb2.PayloadInfo, bytes]:
    with _channel(server, "distribution-server") as channel:
        stub = devices_pb2_grpc.DistributionServiceStub(channel)
        request = devices_pb2.GetPayloadRequest(
            device_id=device_id, release=release, format=fmt, offset=offset, **extra
        )
        responses = list(stub.GetPayload(request, timeout=60))
    info = responses[0].info
    return info, b"".join(r.chunk for r in responses[1:])


def _manifest_key_der(server: RunningKms) -> bytes:
    with _channel(server, "auditor") as channel:
        pem = (
            keys_pb2_grpc.KeyServiceStub(channel)
            .GetPublicKey(keys_pb2.GetPublicKeyRequest(name=f"keys/{PRODUCT}-manifest"), timeout=30)
            .pem
        )
    return serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _device(server: RunningKms, device_id: str, secret: bytes, floor: int = 0) -> DeviceModel:
    return DeviceModel(
        efuse_secret=secret,
        device_id=device_id.encode(),
        chip_id=CHIP_ID,
        manifest_keys_der=[_manifest_key_der(server)],
        floor=floor,
        slot_size=1 << 20,
    )


def test_registration_outcomes_per_row(kms_server: RunningKms) -> None:
    secret_a, secret_b = os.urandom(32), os.urandom(32)
    rows = [
        _row(1, "24:6f:28:00:00:01", secret_a),
        _row(2, "bad id with spaces", os.urandom(32)),
        _row(3, "24:6f:28:00:00:03", os.urandom(32), chip="esp8266"),
        _row(4, "24:6f:28:00:00:04", secret_b),
    ]
    outcomes = _register(kms_server, rows)
    assert [(o.row, o.status) for o in outcomes] == [
        (1, Outcome.CREATED),
        (2, Outcome.REJECTED),
        (3, Outcome.REJECTED),
        (4, Outcome.CREATED),
    ]
    assert (
        outcomes[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "device id" in outcomes[1].message
    )
    assert "esp8266" in outcomes[2].message
    again = _register(
        kms_server, [_row(7, "24:6f:28:00:00:01", secret_a), _row(8, "24:6f:28:00:00:04", os.urandom(32))]
    )
    assert [(o.row, o.status) for o in again] == [(7, Outcome.UNCHANGED), (8, Outcome.REJECTED)]
    assert again[1].code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    plain = _register(kms_server, [_row(9, "24:6f:28:00:00:01", secret_a)], wrapped=False)
    assert plain[0].status == Outcome.UNCHANGED  # the same secret through the other transport


def test_payload_installs_on_the_device_model(kms_server: RunningKms) -> None:
    secret = os.urandom(32)
    device_id = "24:6f:28:00:01:00"
    assert _register(kms_server, [_row(1, device_id, secret)])[0].status == Outcome.CREATED
    release, image = _release(kms_server, secure_version=5, seed=11)
    info, payload = _payload(kms_server, device_id, release)
    assert info.total_size == len(payload) == 384 + len(image) + 16 * -(-len(image) // 4096)
    device = _device(kms_server, device_id, secret, floor=1)
    before = device.state()
    result = device.apply_update(payload)
    assert result.verdict is Verdict.OK, result.detail
    assert device.state() != before and device.floor == 5
    assert device.flash.slots[1][: len(image)] == image

    # every HSM use of the payload is a key use recorded with the distribution server's identity
    import sqlite3

    db = sqlite3.connect(f"file:{kms_server.state_dir / 'kms.db'}?mode=ro", uri=True)
    rows = db.execute(
        "SELECT caller, operation, key_version FROM signatures WHERE subject = ? ORDER BY id",
        [f"{release}@{device_id}"],
    ).fetchall()
    db.close()
    caller = "spiffe://kms.dev/distribution-server/dev"
    assert [(c, op) for c, op, _ in rows] == [(caller, "sign-manifest"), (caller, "derive-payload-key")]
    assert rows[0][2].startswith("keys/") and rows[1][2].startswith("keys/")

    other = _device(kms_server, "24:6f:28:00:01:01", secret)
    assert other.apply_update(payload).verdict is Verdict.WRONG_DEVICE
    stranger = _device(kms_server, device_id, os.urandom(32))
    assert stranger.apply_update(payload).verdict is Verdict.BAD_SEGMENT  # another secret: other key


def test_payloads_are_deterministic_and_resume_from_another_process(
    kms_server: RunningKms, tmp_path: Path
) -> None:
    secret = os.urandom(32)
    device_id = "24:6f:28:00:02:00"
    _register(kms_server, [_row(1, device_id, secret)])
    release, _image = _release(kms_server, secure_version=5, seed=12, size=150_000)
    _, full = _payload(kms_server, device_id, release)
    assert _payload(kms_server, device_id, release)[1] == full
    rng = random.Random(5)
    cuts = sorted({rng.randrange(1, len(full)) for _ in range(6)} | {384, 384 + 4112})
    with running_kms(kms_server.state_dir, init=False) as second:
        for cut in cuts:
            server = second if cut % 2 else kms_server
            info, rest = _payload(server, device_id, release, offset=cut)
            assert info.offset == cut and full[:cut] + rest == full
        _, at_end = _payload(second, device_id, release, offset=len(full))
        assert at_end == b""


def test_esp_encrypted_img_payload_decrypts_with_the_device_secret(kms_server: RunningKms) -> None:
    secret = os.urandom(32)
    device_id = "24:6f:28:00:03:00"
    hmac_of = device_esp.efuse_hmac_from_secret(secret)
    ecies = device_esp.device_public_key_der(hmac_of)
    assert (
        _register(kms_server, [_row(1, device_id, secret, ecies=_spki_point(ecies))])[0].status
        == Outcome.CREATED
    )
    release, image = _release(kms_server, secure_version=5, seed=13)
    _, payload = _payload(kms_server, device_id, release, fmt=devices_pb2.ESP_ENCRYPTED_IMG_ECIES)
    assert device_esp.decrypt(payload, hmac_of, strict=True) == image
    _, again = _payload(kms_server, device_id, release, fmt=devices_pb2.ESP_ENCRYPTED_IMG_ECIES, offset=1000)
    assert again == payload[1000:]


def _spki_point(der: bytes) -> bytes:
    key = serialization.load_der_public_key(der)
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _code(
    server: RunningKms,
    device_id: str,
    release: str,
    *,
    offset: int = 0,
    fmt: devices_pb2.PayloadFormat.ValueType = devices_pb2.FKSP_V1,
    **extra: int,
) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        _payload(server, device_id, release, offset=offset, fmt=fmt, **extra)
    return error.value.code()


def test_bad_payload_requests(kms_server: RunningKms) -> None:
    secret = os.urandom(32)
    device_id = "24:6f:28:00:04:00"
    _register(kms_server, [_row(1, device_id, secret)])
    release, image = _release(kms_server, secure_version=5, seed=14)
    total = _payload(kms_server, device_id, release)[0].total_size
    assert _code(kms_server, "24:6f:28:ff:ff:ff", release) == grpc.StatusCode.NOT_FOUND
    assert _code(kms_server, device_id, "releases/" + "00" * 32) == grpc.StatusCode.NOT_FOUND
    assert _code(kms_server, device_id, release, offset=total + 1) == grpc.StatusCode.OUT_OF_RANGE
    assert (
        _code(kms_server, device_id, release, device_secure_version=6) == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert _code(kms_server, device_id, release, fmt=devices_pb2.ESP_ENCRYPTED_IMG_ECIES) == (
        grpc.StatusCode.FAILED_PRECONDITION  # registered without an ECIES key
    )
    with _channel(kms_server, "security-officer") as channel:
        stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        revoked = stub.RevokeDevice(devices_pb2.RevokeDeviceRequest(device_id=device_id), timeout=30)
    assert revoked.state == "revoked"
    assert _code(kms_server, device_id, release) == grpc.StatusCode.FAILED_PRECONDITION
    assert hashlib.sha256(image).digest().hex() in release


def test_roles_on_the_device_paths(kms_server: RunningKms) -> None:
    with _channel(kms_server, "build-server") as channel:
        stub = devices_pb2_grpc.DistributionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.GetPayload(devices_pb2.GetPayloadRequest(device_id="x", release="y"), timeout=10))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        registry = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            registry.GetRegistrationKey(devices_pb2.GetRegistrationKeyRequest(product=PRODUCT), timeout=10)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_factory_to_device_with_the_cli_and_the_c_decoder(kms_server: RunningKms, tmp_path: Path) -> None:
    """kmsctl at the factory and the distribution server; the C/mbedTLS decoder on the device."""
    build = tmp_path / "c"
    make = subprocess.run(
        ["make", "-s", "-C", str(ROOT / "client" / "device-c"), f"BUILD={build}"],
        capture_output=True,
        text=True,
    )
    assert make.returncode == 0, make.stderr
    key_file = tmp_path / "device.key"
    made = kms_server.kmsctl("devices", "new-secret", "-o", str(key_file))
    assert made.returncode == 0, made.stderr
    device_id = "24:6f:28:00:05:00"
    csv = tmp_path / "devices.csv"
    csv.write_text(f"device_id,chip,secret_file\n{device_id},{CHIP},{key_file}\n")
    registered = kms_server.kmsctl("devices", "register", "--product", PRODUCT, "--csv", str(csv), "--json")
    assert registered.returncode == 0, registered.stderr
    assert json.loads(registered.stdout)["created"] == 1
    release, image = _release(kms_server, secure_version=5, seed=15)
    out = tmp_path / "payload.bin"
    fetched = kms_server.kmsctl("payload", "get", "--device", device_id, "--release", release, "-o", str(out))
    assert fetched.returncode == 0, fetched.stderr
    manifest_key = tmp_path / "manifest.der"
    manifest_key.write_bytes(_manifest_key_der(kms_server))
    plain = tmp_path / "image.bin"
    decoded = subprocess.run(
        [
            str(build / "fksp_tool"),
            "--secret-hex",
            key_file.read_bytes().hex(),
            "--device-id",
            device_id,
            "--chip-id",
            str(CHIP_ID),
            "--floor",
            "4",
            "--manifest-key",
            str(manifest_key),
            "--in",
            str(out),
            "--out",
            str(plain),
        ],
        capture_output=True,
        text=True,
    )
    assert (decoded.returncode, decoded.stdout.strip()) == (0, "ok"), decoded.stderr
    assert plain.read_bytes() == image
    downgrade = subprocess.run(
        [
            str(build / "fksp_tool"),
            "--secret-hex",
            key_file.read_bytes().hex(),
            "--device-id",
            device_id,
            "--chip-id",
            str(CHIP_ID),
            "--floor",
            "6",
            "--manifest-key",
            str(manifest_key),
            "--in",
            str(out),
            "--out",
            str(tmp_path / "no.bin"),
        ],
        capture_output=True,
        text=True,
    )
    assert downgrade.stdout.strip() == "downgrade"
