"""Digest signatures, public keys and eFuse digests, checked by openssl and espsecure."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import utils

from kmsapi.v1 import common_pb2, keys_pb2, keys_pb2_grpc, signing_pb2, signing_pb2_grpc
from kmsctl import InvalidArgumentError, NotFoundError
from tests.support.espressif_tools import run
from tests.support.kms_server import RunningKms


def _openssl_verify(pem: Path, hash_name: str, data: Path, der_signature: bytes, tmp: Path) -> bool:
    sig = tmp / "sig.der"
    sig.write_bytes(der_signature)
    args = ["openssl", "dgst", f"-{hash_name}", "-verify", str(pem), "-signature", str(sig)]
    return subprocess.run([*args, str(data)], capture_output=True, check=False).returncode == 0


def _openssl_verify_pss(pem: Path, data: Path, signature: bytes, tmp: Path) -> bool:
    sig = tmp / "sig.bin"
    sig.write_bytes(signature)
    args = [
        "openssl",
        "dgst",
        "-sha256",
        "-sigopt",
        "rsa_padding_mode:pss",
        "-sigopt",
        "rsa_pss_saltlen:32",
        "-sigopt",
        "rsa_mgf1_md:sha256",
        "-verify",
        str(pem),
        "-signature",
        str(sig),
        str(data),
    ]
    return subprocess.run(args, capture_output=True, check=False).returncode == 0


def _raw_to_der(raw: bytes) -> bytes:
    half = len(raw) // 2
    return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


@pytest.mark.parametrize(
    ("key", "hash_name"),
    [("keys/artifacts-p256", "sha256"), ("keys/p384-1-slot0", "sha384"), ("keys/rsa-1-slot0", "sha256")],
)
def test_openssl_verifies_every_encoding(
    kms_server: RunningKms, tmp_path: Path, key: str, hash_name: str
) -> None:
    data = tmp_path / "artifact.bin"
    data.write_bytes(b"firmware artifact that is not an ESP image\n" * 1000)
    digest = hashlib.new(hash_name, data.read_bytes()).digest()
    pem = tmp_path / "pub.pem"
    with kms_server.client() as kms:
        pem.write_text(kms.get_public_key(key).pem)
        raw = kms.sign_digest(key, digest, hash=hash_name, encoding="raw")  # type: ignore[arg-type]
        assert raw.key_version == f"{key}/versions/1"
        if "rsa" in key:
            assert _openssl_verify_pss(pem, data, raw.signature, tmp_path)
            assert not _openssl_verify_pss(
                pem, data, raw.signature[:-1] + bytes([raw.signature[-1] ^ 1]), tmp_path
            )
            with pytest.raises(InvalidArgumentError, match="DER"):
                kms.sign_digest(key, digest, hash=hash_name, encoding="der")  # type: ignore[arg-type]
            return
        der = kms.sign_digest(key, digest, hash=hash_name, encoding="der")  # type: ignore[arg-type]
    assert _openssl_verify(pem, hash_name, data, der.signature, tmp_path)
    assert _openssl_verify(pem, hash_name, data, _raw_to_der(raw.signature), tmp_path)
    data.write_bytes(data.read_bytes() + b"x")
    assert not _openssl_verify(pem, hash_name, data, der.signature, tmp_path)


def test_thousand_signatures_verify_with_distinct_r(kms_server: RunningKms, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with kms_server.client() as kms:
        public = serialization.load_pem_public_key(kms.get_public_key("keys/artifacts-p256").pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        seen_r: set[bytes] = set()
        for i in range(1000):
            digest = hashlib.sha256(i.to_bytes(4, "big")).digest()
            sig = kms.sign_digest("keys/artifacts-p256", digest).signature
            public.verify(_raw_to_der(sig), digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            seen_r.add(sig[:32])
    assert len(seen_r) == 1000


def _stub(server: RunningKms, role: str = "build-server") -> grpc.Channel:
    creds = server.credentials(role)
    return grpc.secure_channel(
        server.target,
        grpc.ssl_channel_credentials(
            creds["ca"].read_bytes(), creds["key"].read_bytes(), creds["cert"].read_bytes()
        ),
    )


def test_crc32c_integrity_fields(kms_server: RunningKms) -> None:
    digest = hashlib.sha256(b"x").digest()
    with _stub(kms_server) as channel:
        stub = signing_pb2_grpc.SigningServiceStub(channel)
        request = signing_pb2.SignDigestRequest(
            name="keys/artifacts-p256", digest=common_pb2.Digest(sha256=digest)
        )
        plain = stub.SignDigest(request, timeout=30)
        assert not plain.verified_digest_crc32c
        import google_crc32c

        assert plain.signature_crc32c == google_crc32c.value(plain.signature)
        request.digest_crc32c = google_crc32c.value(digest)
        assert stub.SignDigest(request, timeout=30).verified_digest_crc32c
        request.digest_crc32c ^= 1
        with pytest.raises(grpc.RpcError) as error:
            stub.SignDigest(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_digest_requests(kms_server: RunningKms) -> None:
    with kms_server.client() as kms:
        with pytest.raises(InvalidArgumentError, match="sha384"):
            kms.sign_digest("keys/p384-1-slot0", b"\x00" * 32, hash="sha256")
        with pytest.raises(NotFoundError):
            kms.sign_digest("keys/nope", b"\x00" * 32)
        with pytest.raises(NotFoundError):
            kms.sign_digest("keys/artifacts-p256/versions/9", b"\x00" * 32)
        with pytest.raises(InvalidArgumentError, match="malformed key name"):
            kms.sign_digest("keys/Bad Name", b"\x00" * 32)
    with _stub(kms_server) as channel:
        stub = signing_pb2_grpc.SigningServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.SignDigest(
                signing_pb2.SignDigestRequest(
                    name="keys/artifacts-p256", digest=common_pb2.Digest(sha256=b"short")
                ),
                timeout=30,
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("key", ["keys/p256-1-slot0", "keys/p384-1-slot0", "keys/rsa-1-slot0"])
def test_efuse_digest_matches_espsecure(kms_server: RunningKms, tmp_path: Path, key: str) -> None:
    with _stub(kms_server, "auditor") as channel:
        response = keys_pb2_grpc.KeyServiceStub(channel).GetPublicKey(
            keys_pb2.GetPublicKeyRequest(name=key), timeout=30
        )
    pem = tmp_path / "pub.pem"
    pem.write_text(response.pem)
    expected = tmp_path / "digest.bin"
    result = run("espsecure", "digest-sbv2-public-key", "--keyfile", str(pem), "-o", str(expected))
    assert result.returncode == 0, result.stderr
    assert response.sbv2_key_digest == expected.read_bytes()
    cli_out = tmp_path / "cli-digest.bin"
    cli = kms_server.kmsctl("efuse-digest", key, "-o", str(cli_out))
    assert cli.returncode == 0, cli.stderr
    assert cli_out.read_bytes() == expected.read_bytes()


def test_keys_list_json(kms_server: RunningKms) -> None:
    result = kms_server.kmsctl("keys", "list", "--product", "rsa-3", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    text = json.dumps(listing)
    for slot in range(3):
        assert f"keys/rsa-3-slot{slot}" in text
    assert "keys/p256" not in text


def test_every_key_use_is_recorded_with_the_caller(kms_server: RunningKms) -> None:
    import sqlite3

    digest = hashlib.sha256(b"recorded").digest()
    with kms_server.client() as kms:
        signature = kms.sign_digest("keys/artifacts-p256", digest)
    db = sqlite3.connect(f"file:{kms_server.state_dir / 'kms.db'}?mode=ro", uri=True)
    rows = db.execute(
        "SELECT caller, operation, key_version, subject FROM signatures WHERE digest = ?", [digest]
    ).fetchall()
    db.close()
    assert rows == [("spiffe://kms.dev/build-server/dev", "sign-digest", signature.key_version, digest.hex())]
