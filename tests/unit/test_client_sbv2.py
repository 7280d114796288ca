"""The client's Secure Boot V2 eFuse key digest against ``espsecure digest-sbv2-public-key``."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from kmsctl import Algorithm, sbv2_key_digest
from kmsctl._sbv2 import describe_public_key
from tests.support import espressif_tools


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("make_key", "algorithm"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), Algorithm.ECDSA_P256_SHA256),
        (lambda: ec.generate_private_key(ec.SECP384R1()), Algorithm.ECDSA_P384_SHA384),
        (
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
            Algorithm.RSA_3072_PSS_SHA256,
        ),
    ],
    ids=["p256", "p384", "rsa3072"],
)
def test_digest_matches_espsecure(make_key: object, algorithm: Algorithm, tmp_path: Path) -> None:
    assert callable(make_key)
    public_pem = pem(make_key())
    (tmp_path / "pub.pem").write_bytes(public_pem)
    done = espressif_tools.run(
        "espsecure",
        "digest-sbv2-public-key",
        "--keyfile",
        str(tmp_path / "pub.pem"),
        "-o",
        str(tmp_path / "d.bin"),
    )
    assert done.returncode == 0, done.stderr
    assert describe_public_key(public_pem) == (algorithm, (tmp_path / "d.bin").read_bytes())
    assert sbv2_key_digest(public_pem.decode()) == (tmp_path / "d.bin").read_bytes()


@pytest.mark.parametrize(
    "key",
    [
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP521R1()),
        ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["rsa2048", "p521", "ed25519"],
)
def test_keys_secure_boot_v2_cannot_use_are_refused(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
) -> None:
    with pytest.raises(ValueError, match=r"RSA key of|not an RSA-3072"):
        sbv2_key_digest(pem(key))
