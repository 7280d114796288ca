"""Signing ESP app images through the running service, checked by espsecure (an independent verifier)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import grpc
import pytest

from kmsapi.v1 import signing_pb2, signing_pb2_grpc
from kmsctl import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from tests.e2e.conftest import ALGORITHMS
from tests.support.esp_images import build_app_image, refresh_footer
from tests.support.espressif_tools import exit_codes, run
from tests.support.kms_server import RunningKms, image_bytes

CHIP_FOR = {"p256": "esp32c6", "p384": "esp32c5", "rsa": "esp32s3"}
SECTOR = 4096
BLOCK = 1216


def _public_keys(server: RunningKms, product: str, blocks: int, tmp: Path) -> list[Path]:
    paths = []
    with server.client() as kms:
        for slot in range(blocks):
            pem = kms.get_public_key(f"keys/{product}-slot{slot}").pem
            path = tmp / f"{product}-slot{slot}.pem"
            path.write_text(pem)
            paths.append(path)
    return paths


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
def test_espsecure_verifies_every_block_and_rejects_flips(
    kms_server: RunningKms, tmp_path: Path, alg: str, blocks: int
) -> None:
    product = f"{alg}-{blocks}"
    image = build_app_image(CHIP_FOR[alg], 64 * 1024 + 123, secure_version=1, seed=blocks)
    with kms_server.client() as kms:
        signed = kms.sign_image(product, image)
    data = image_bytes(signed)
    assert data[: len(image)] == image
    assert len(data) % SECTOR == 0 and set(data[len(image) : len(data) - SECTOR]) <= {0xFF}
    assert signed.release.key_versions == tuple(f"keys/{product}-slot{s}/versions/1" for s in range(blocks))
    assert signed.release.output_sha256 == hashlib.sha256(data).digest()

    info = run("espsecure", "signature-info-v2", str(_write(tmp_path / "s.bin", data)))
    assert info.returncode == 0, info.stderr
    keys = _public_keys(kms_server, product, blocks, tmp_path)

    # Every block verifies with its own key: espsecure accepts if any block verifies, so check each key.
    commands: list[list[str]] = [
        ["verify-signature", "--version", "2", "--keyfile", str(k), str(tmp_path / "s.bin")] for k in keys
    ]
    # A flip in the signed body, the padding, or in each block's image digest, public key or signature
    # must make every key fail; a flip in another block must leave only that block's key failing.
    sector = len(data) - SECTOR
    flips = [0, 0x20 + 4, len(image) - 1, sector - 1]
    for b in range(blocks):
        flips += [sector + b * BLOCK + off for off in (4, 40, 200, 1000, 1196)]
    expectations: list[tuple[int, int]] = []  # (command index, expected exit 0?)
    for n, offset in enumerate(flips):
        tampered = bytearray(data)
        tampered[offset] ^= 0x01
        path = _write(tmp_path / f"t{n}.bin", bytes(tampered))
        in_block = (offset - sector) // BLOCK if offset >= sector else None
        for slot, key in enumerate(keys):
            commands.append(["verify-signature", "--version", "2", "--keyfile", str(key), str(path)])
            expectations.append((len(commands) - 1, in_block is not None and in_block != slot))
    codes = exit_codes("espsecure", commands)
    assert codes[:blocks] == [0] * blocks
    for index, should_pass in expectations:
        assert (codes[index] == 0) == should_pass, (commands[index], codes[index])


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_cli_sign_walkthrough(kms_server: RunningKms, tmp_path: Path) -> None:
    app = _write(tmp_path / "app.bin", build_app_image("esp32c6", 200_000, secure_version=2, version="2.1.0"))
    out = tmp_path / "app.signed.bin"
    result = kms_server.kmsctl("sign", str(app), "--product", "p256-1", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    pem = tmp_path / "pub.pem"
    assert kms_server.kmsctl("public-key", "keys/p256-1-slot0", "-o", str(pem)).returncode == 0
    verify = run("espsecure", "verify-signature", "--version", "2", "--keyfile", str(pem), str(out))
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_same_input_returns_the_stored_release(kms_server: RunningKms) -> None:
    image = build_app_image("esp32s3", 50_000, secure_version=3, seed=77)
    with kms_server.client() as kms:
        first = kms.sign_image("rsa-1", image)
        second = kms.sign_image("rsa-1", image)
    assert not first.release.reused and second.release.reused
    assert second.data == first.data  # RSA-PSS is randomized: equal bytes prove no second signature
    assert second.release.name == first.release.name


def test_release_records_the_caller_and_descriptor(kms_server: RunningKms) -> None:
    image = build_app_image(
        "esp32c6", 40_000, secure_version=4, version="4.0.0-rc1", project_name="thermo", seed=5
    )
    with kms_server.client() as kms:
        release = kms.sign_image("p256-2", image).release
    assert release.signed_by == "spiffe://kms.dev/build-server/dev"
    assert (release.chip, release.version, release.secure_version, release.project_name) == (
        "esp32c6",
        "4.0.0-rc1",
        4,
        "thermo",
    )
    assert release.input_sha256 == hashlib.sha256(image).digest()


def test_anti_rollback_floor(kms_server: RunningKms) -> None:
    with kms_server.client() as kms:
        kms.sign_image("p384-1", build_app_image("esp32c5", 30_000, secure_version=7, seed=1))
        kms.sign_image("p384-1", build_app_image("esp32c5", 30_000, secure_version=7, seed=2))  # equal: fine
        with pytest.raises(FailedPreconditionError, match="floor 7"):
            kms.sign_image("p384-1", build_app_image("esp32c5", 30_000, secure_version=6, seed=3))


def test_chip_rules(kms_server: RunningKms) -> None:
    with kms_server.client() as kms:
        with pytest.raises(FailedPreconditionError, match="RSA-3072"):
            kms.sign_image("p256-1", build_app_image("esp32s3", 30_000))  # S3 takes RSA only
        with pytest.raises(FailedPreconditionError, match="one Secure Boot V2 key"):
            kms.sign_image("rsa-2", build_app_image("esp32", 30_000))
        with pytest.raises(FailedPreconditionError, match="one Secure Boot V2 key"):
            kms.sign_image("p256-2", build_app_image("esp32c2", 30_000))
        with pytest.raises(NotFoundError, match="no Secure Boot V2 keys"):
            kms.sign_image("no-such-product", build_app_image("esp32c6", 30_000))


def _malformed() -> dict[str, bytes]:
    good = build_app_image("esp32c3", 20_000, seed=9)
    cases: dict[str, bytes] = {}
    cases["bad magic"] = b"\x00" + good[1:]
    bad = bytearray(good)
    bad[1] = 0
    cases["zero segments"] = bytes(bad)
    bad = bytearray(good)
    bad[1] = 17
    cases["too many segments"] = bytes(bad)
    bad = bytearray(good)
    struct.pack_into("<I", bad, 24 + 4, 10_000_000)
    cases["segment past end"] = bytes(bad)
    cases["checksum"] = _flip_checksum(good)
    bad = bytearray(good)
    bad[-1] ^= 1
    cases["appended sha256"] = bytes(bad)
    bad = bytearray(good)
    bad[0x20] ^= 0xFF
    cases["app descriptor magic"] = refresh_footer(bytes(bad))
    bad = bytearray(good)
    struct.pack_into("<H", bad, 12, 0x7777)
    cases["unknown chip"] = refresh_footer(bytes(bad))
    cases["trailing bytes"] = good + b"\x00" * 16
    cases["truncated"] = good[:100]
    return cases


def _flip_checksum(good: bytes) -> bytes:
    """Change one body byte and fix the appended hash, so only the XOR checksum is wrong."""
    bad = bytearray(good)
    bad[0x200] ^= 0x10
    body = bytes(bad[:-32])
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("case", sorted(_malformed()))
def test_malformed_image_is_invalid_argument_and_service_keeps_serving(
    kms_server: RunningKms, case: str
) -> None:
    image = _malformed()[case]
    with kms_server.client() as kms:
        with pytest.raises(InvalidArgumentError) as error:
            kms.sign_image("p256-1", image)
        assert error.value.message  # a message a person can act on
        ok = kms.sign_image(
            "p256-1", build_app_image("esp32c6", 10_000, secure_version=9, seed=hash(case) % 1000)
        )
    assert ok.release.output_size % SECTOR == 0


def test_image_over_the_limit_is_refused_before_upload(kms_server: RunningKms) -> None:
    image = build_app_image("esp32c6", 16 * 1024 * 1024 + 4096)
    with kms_server.client() as kms, pytest.raises(ResourceExhaustedError, match="limit"):
        kms.sign_image("p256-1", image)


def test_full_image_and_sector_only_responses_agree(kms_server: RunningKms) -> None:
    """SIGNED_IMAGE streams the whole signed image; SIGNATURE_SECTOR (kmsctl's default) only the sector."""
    image = build_app_image("esp32c6", 300_000, secure_version=12, seed=404)
    with kms_server.client() as kms:
        rebuilt = image_bytes(kms.sign_image("p256-1", image))
    files = kms_server.credentials()
    creds = grpc.ssl_channel_credentials(*(files[k].read_bytes() for k in ("ca", "key", "cert")))
    with grpc.secure_channel(kms_server.target, creds) as channel:
        stub = signing_pb2_grpc.SigningServiceStub(channel)
        header = signing_pb2.SignImageHeader(product="p256-1", image_size=len(image))
        requests = [signing_pb2.SignImageRequest(header=header)] + [
            signing_pb2.SignImageRequest(chunk=image[i : i + 65536]) for i in range(0, len(image), 65536)
        ]
        responses = list(stub.SignImage(iter(requests), timeout=60))
    assert responses[0].release.reused
    full = b"".join(r.chunk for r in responses[1:])
    assert full == rebuilt and len(responses) > 2
