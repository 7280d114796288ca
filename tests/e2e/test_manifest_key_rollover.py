"""OTA manifest key rollover end to end: a real server (SoftHSM2, SQLite, gRPC over mTLS) rotates a product's
manifest key; the Python device model, which trusts only the first key, refuses payloads signed by the new
one until it applies the statements the server hands out, and refuses forged statements.

The device model checks statements with ``kmsctl.device.rollover``, which shares no code with the service.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from kmsapi.v1 import devices_pb2, devices_pb2_grpc, keys_pb2, keys_pb2_grpc
from kmsctl import FailedPreconditionError
from kmsctl._admin import KeyAdminClient
from kmsctl.device import DeviceModel, RolloverVerdict, Verdict, parse_statement, split_statements
from tests.support.esp_images import build_app_image
from tests.support.kms_server import KeySpec, RunningKms, running_kms

PRODUCT = "roll"
CHIP = "esp32c6"
CHIP_ID = 0x000D
MANIFEST_KEY = f"keys/{PRODUCT}-manifest"
KEYS = [KeySpec(f"{PRODUCT}-sbv2-0", PRODUCT, "ecdsa-p256", 0)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    state = tmp_path_factory.mktemp("kms-rollover")
    with running_kms(state, KEYS, product_sets=[PRODUCT]) as running:
        yield running


def _channel(server: RunningKms, role: str) -> grpc.Channel:
    files = server.credentials(role)
    creds = grpc.ssl_channel_credentials(*(files[k].read_bytes() for k in ("ca", "key", "cert")))
    return grpc.secure_channel(server.target, creds)


def _register(server: RunningKms, secret: bytes) -> str:
    device_id = f"{PRODUCT}-{os.urandom(4).hex()}"
    row = devices_pb2.DeviceRow(row=1, device_id=device_id, chip=CHIP, secret=secret)

    def requests() -> Iterator[devices_pb2.RegisterDevicesRequest]:
        yield devices_pb2.RegisterDevicesRequest(header=devices_pb2.RegisterDevicesHeader(product=PRODUCT))
        yield devices_pb2.RegisterDevicesRequest(devices=devices_pb2.DeviceRows(rows=[row]))

    with _channel(server, "factory-registrar") as channel:
        (response,) = list(devices_pb2_grpc.DeviceRegistryServiceStub(channel).RegisterDevices(requests()))
    assert response.outcomes[0].status == devices_pb2.RowOutcome.CREATED
    return device_id


def _release(server: RunningKms, secure_version: int, seed: int) -> str:
    with server.client() as kms:
        signed = kms.sign_image(
            PRODUCT, build_app_image(CHIP, 20_000, secure_version=secure_version, seed=seed)
        )
    return signed.release.name


def _payload(server: RunningKms, device_id: str, release: str) -> tuple[str, bytes]:
    with _channel(server, "distribution-server") as channel:
        stub = devices_pb2_grpc.DistributionServiceStub(channel)
        request = devices_pb2.GetPayloadRequest(
            device_id=device_id, release=release, format=devices_pb2.FKSP_V1
        )
        responses = list(stub.GetPayload(request, timeout=60))
    return responses[0].info.manifest_key_version, b"".join(r.chunk for r in responses[1:])


def _public_der(server: RunningKms, name: str) -> bytes:
    with server.client("auditor") as kms:
        pem = kms.get_public_key(name).pem
    return serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _rollover(
    server: RunningKms, trusted_key_id: bytes, product: str = PRODUCT
) -> keys_pb2.GetManifestKeyRolloverResponse:
    with _channel(server, "distribution-server") as channel:
        return keys_pb2_grpc.KeyServiceStub(channel).GetManifestKeyRollover(
            keys_pb2.GetManifestKeyRolloverRequest(product=product, trusted_key_id=trusted_key_id), timeout=30
        )


def _forge(statement: bytes, attacker: ec.EllipticCurvePrivateKey, *, swap_key: bool) -> bytes:
    """v1's statement with its new key replaced by the attacker's (``swap_key``: the signature kept), or
    a statement naming v1 as signer for the attacker's key, signed by the attacker."""
    parsed = parse_statement(statement)
    der = attacker.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    p = len(parsed.product)
    signed = parsed.signed[: 46 + p] + hashlib.sha256(der).digest() + parsed.signed[78 + p : 80 + p] + der
    if swap_key:
        return signed + parsed.signature
    r, s = decode_dss_signature(
        attacker.sign(hashlib.sha256(signed).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
    )
    return signed + r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_a_device_follows_two_rotations_by_rollover_and_refuses_forgeries(
    server: RunningKms, tmp_path: Path
) -> None:
    secret = os.urandom(32)
    device_id = _register(server, secret)
    v1_der = _public_der(server, f"{MANIFEST_KEY}/versions/1")
    v1_id = hashlib.sha256(v1_der).digest()
    device = DeviceModel(
        efuse_secret=secret,
        device_id=device_id.encode(),
        chip_id=CHIP_ID,
        manifest_keys_der=[v1_der],
        floor=0,
        slot_size=1 << 17,
        product=PRODUCT.encode(),
    )
    signer, payload = _payload(server, device_id, _release(server, secure_version=1, seed=1))
    assert signer == f"{MANIFEST_KEY}/versions/1"
    assert device.apply_update(payload).verdict is Verdict.OK
    assert _rollover(server, v1_id).statements == [], "the device trusts the current key already"

    with server.client("security-officer") as kms:
        officer = KeyAdminClient(kms)
        assert officer.rotate_key(MANIFEST_KEY).key_version == f"{MANIFEST_KEY}/versions/2"
        assert officer.rotate_key(MANIFEST_KEY).key_version == f"{MANIFEST_KEY}/versions/3"

    signer, payload = _payload(server, device_id, _release(server, secure_version=2, seed=2))
    assert signer == f"{MANIFEST_KEY}/versions/3"
    before = device.state()
    result = device.apply_update(payload)
    assert result.verdict is Verdict.BAD_SIGNATURE and "no trusted manifest key" in result.detail
    assert device.state() == before

    response = _rollover(server, v1_id)
    v3_id = hashlib.sha256(_public_der(server, f"{MANIFEST_KEY}/versions/3")).digest()
    assert [(s.from_version, s.to_version) for s in response.statements] == [
        (f"{MANIFEST_KEY}/versions/1", f"{MANIFEST_KEY}/versions/2"),
        (f"{MANIFEST_KEY}/versions/2", f"{MANIFEST_KEY}/versions/3"),
    ]
    assert response.statements[0].from_key_id == v1_id
    assert response.current_version == f"{MANIFEST_KEY}/versions/3" and response.current_key_id == v3_id
    statements = [s.statement for s in response.statements]

    attacker = ec.generate_private_key(ec.SECP256R1())
    for forged in (
        _forge(statements[0], attacker, swap_key=True),
        _forge(statements[0], attacker, swap_key=False),
    ):
        rejected = device.apply_key_rollover([forged, statements[1]])
        assert (rejected.verdict, rejected.index) == (RolloverVerdict.BAD_SIGNATURE, 0)
        assert device.trusted_key_ids == {v1_id}, "a forged chain leaves the device trusting its key"
    out_of_order = device.apply_key_rollover(list(reversed(statements)))
    assert out_of_order.verdict is RolloverVerdict.UNTRUSTED_SIGNER and device.trusted_key_ids == {v1_id}

    assert device.apply_key_rollover(statements).verdict is RolloverVerdict.OK
    assert device.trusted_key_ids == {v3_id}
    assert device.apply_update(payload).verdict is Verdict.OK, "the payload signed by v3 installs now"
    assert device.floor == 2
    replayed = device.apply_key_rollover(statements)
    assert replayed.verdict is RolloverVerdict.UNTRUSTED_SIGNER and device.trusted_key_ids == {v3_id}

    # The CLI writes the same chain, checked; --trusted-key lets it check the first signature too.
    chain_file = tmp_path / "chain.fkrs"
    written = server.kmsctl(
        "keys",
        "rollover",
        "--product",
        PRODUCT,
        "--trusted-key-id",
        v1_id.hex(),
        "-o",
        str(chain_file),
        "--json",
    )
    assert written.returncode == 0, written.stderr
    summary = json.loads(written.stdout)
    assert chain_file.read_bytes() == b"".join(statements)
    assert split_statements(chain_file.read_bytes()) == statements
    assert summary["current_key_id"] == v3_id.hex() and not summary["first_signature_checked"]
    assert [s["to_version"] for s in summary["statements"]] == [
        f"{MANIFEST_KEY}/versions/2",
        response.current_version,
    ]
    pem = tmp_path / "v1.pem"
    pem.write_bytes(
        serialization.load_der_public_key(v1_der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    checked = server.kmsctl(
        "keys", "rollover", "--product", PRODUCT, "--trusted-key", str(pem), "-o", str(chain_file), "--json"
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["first_signature_checked"]
    current = server.kmsctl(
        "keys", "rollover", "--product", PRODUCT, "--trusted-key-id", v3_id.hex(), "-o", str(chain_file)
    )
    assert current.returncode == 0 and chain_file.read_bytes() == b""

    # Each statement's signature is a key use of the version that made it, attributed to the officer.
    with sqlite3.connect(f"file:{server.state_dir / 'kms.db'}?mode=ro", uri=True) as db:
        uses = db.execute(
            "SELECT caller, key_version, subject FROM signatures "
            "WHERE operation = 'sign-key-rollover' ORDER BY id"
        ).fetchall()
    assert uses == [
        ("spiffe://kms.dev/security-officer/dev", f"{MANIFEST_KEY}/versions/1", f"{MANIFEST_KEY}/versions/2"),
        ("spiffe://kms.dev/security-officer/dev", f"{MANIFEST_KEY}/versions/2", f"{MANIFEST_KEY}/versions/3"),
    ]


def test_refusals_are_status_codes_a_person_can_act_on(server: RunningKms, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as unknown:
        _rollover(server, bytes(32))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"manifest key {MANIFEST_KEY} has key id" in (unknown.value.details() or "")
    with pytest.raises(grpc.RpcError) as short:
        _rollover(server, bytes(31))
    assert short.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as no_key:
        _rollover(server, bytes(32), product="no-such-product")
    assert no_key.value.code() == grpc.StatusCode.NOT_FOUND

    result = server.kmsctl(
        "keys", "rollover", "--product", PRODUCT, "--trusted-key-id", "00" * 32, "-o", str(tmp_path / "x")
    )
    assert result.returncode == 4 and not (tmp_path / "x").exists()
    bad = server.kmsctl(
        "keys", "rollover", "--product", PRODUCT, "--trusted-key-id", "abc", "-o", str(tmp_path / "x")
    )
    assert bad.returncode == 3

    primary = _public_der(server, MANIFEST_KEY)
    response = _rollover(server, hashlib.sha256(primary).digest())
    assert response.statements == [] and response.current_key_id == hashlib.sha256(primary).digest()

    exported = tmp_path / "audit.jsonl"
    assert server.kmsctl("audit", "export", "-o", str(exported)).returncode == 0
    records = [json.loads(line) for line in exported.read_text().splitlines()]
    calls = [r for r in records if r.get("operation") == "/kmsapi.v1.KeyService/GetManifestKeyRollover"]
    assert {r["product"] for r in calls} == {PRODUCT, "no-such-product"}
    assert any(r["outcome"] == "NOT_FOUND" and r["product"] == PRODUCT for r in calls)
    assert any(r["outcome"] == "OK" and r["key_version"] == response.current_version for r in calls)


def test_the_primary_moves_forward_only_and_a_corrupt_statement_is_data_loss(server: RunningKms) -> None:
    """The replay of a superseded statement cannot strand a device: no request moves the primary back (so
    statements stay one chain). A statement corrupted in the store is DATA_LOSS, not the caller's error."""
    with server.client("security-officer") as kms:
        officer = KeyAdminClient(kms)
        current = officer.rotate_key(MANIFEST_KEY).key_version  # at least versions 1 and 2, alone too
        number = int(current.rsplit("/", 1)[1])
        older = f"{MANIFEST_KEY}/versions/{number - 1}"
        with pytest.raises(
            FailedPreconditionError, match="a manifest key moves forward only: rotate instead"
        ):
            officer.set_primary_version(older)
        with pytest.raises(FailedPreconditionError, match=f"devices may already trust version {number}"):
            officer.disable_key_version(current, new_primary=older)
        assert officer.rotate_key(MANIFEST_KEY).key.primary_version == f"{MANIFEST_KEY}/versions/{number + 1}"

    v1_id = hashlib.sha256(_public_der(server, f"{MANIFEST_KEY}/versions/1")).digest()
    chain = _rollover(server, v1_id).statements
    assert [s.to_version for s in chain][-1] == f"{MANIFEST_KEY}/versions/{number + 1}"
    select = "SELECT statement FROM manifest_key_rollovers WHERE key_id = ? AND to_version = 2"
    update = "UPDATE manifest_key_rollovers SET statement = ? WHERE key_id = ? AND to_version = 2"
    key_id = MANIFEST_KEY.removeprefix("keys/")
    with sqlite3.connect(server.state_dir / "kms.db") as db:
        (original,) = db.execute(select, [key_id]).fetchone()
        db.execute(update, [original[:-1], key_id])  # one byte short: no longer a statement
    try:
        with pytest.raises(grpc.RpcError) as corrupt:
            _rollover(server, v1_id)
        assert corrupt.value.code() == grpc.StatusCode.DATA_LOSS
        assert "rollover statement introducing keys/roll-manifest/versions/2 is corrupt" in (
            corrupt.value.details() or ""
        )
    finally:
        with sqlite3.connect(server.state_dir / "kms.db") as db:
            db.execute(update, [original, key_id])
    assert [s.statement for s in _rollover(server, v1_id).statements] == [s.statement for s in chain]
