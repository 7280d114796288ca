"""Regenerate the FKRS v1 rollover statement vectors in this folder from the committed test keys.

    python tests/vectors/rollover/generate.py             # rewrite vectors.json
    python tests/vectors/rollover/generate.py --check     # exit 1 if vectors.json is out of date
    python tests/vectors/rollover/generate.py --new-keys  # first make missing key PEM files (done once)

The encoding is written here from ``docs/manifest-key-rollover.md`` alone (struct and hashlib), not with
``kms.domain.rollover``, so the tests comparing the two catch a bug in either. Signatures are deterministic
ECDSA (RFC 6979, ``ec.ECDSA(..., deterministic_signing=True)``), so the same keys always give the same
bytes. The PEM files are TEST keys generated once with ``--new-keys`` and committed; they protect nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

HERE = Path(__file__).parent
KEYS = ("v1", "v2", "v3", "attacker")
PRODUCT = "thermostat"
LONG_PRODUCT = "p" * 62 + "9"  # the longest product name (63 bytes)


def key_path(name: str) -> Path:
    return HERE / f"key-{name}.pem"


def private_key(name: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(key_path(name).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    return key


def spki(name: str) -> bytes:
    return (
        private_key(name)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def key_id(name: str) -> bytes:
    return hashlib.sha256(spki(name)).digest()


def signed_part(product: str, from_version: int, to_version: int, from_key: str, to_key: str) -> bytes:
    """Bytes [0, 80+p+k) of the layout table: magic, version, p, product, from, to, ids, k, key."""
    name = product.encode("ascii")
    der = spki(to_key)
    return (
        b"FKRS"
        + bytes([1, len(name)])
        + name
        + struct.pack("<II", from_version, to_version)
        + key_id(from_key)
        + key_id(to_key)
        + struct.pack("<H", len(der))
        + der
    )


def sign(signer: str, signed: bytes) -> bytes:
    """RFC 6979 ECDSA P-256 over SHA-256(signed), as r || s big-endian."""
    digest = hashlib.sha256(signed).digest()
    der = private_key(signer).sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def statement(product: str, from_version: int, to_version: int, from_key: str, to_key: str) -> bytes:
    signed = signed_part(product, from_version, to_version, from_key, to_key)
    return signed + sign(from_key, signed)


def valid() -> list[dict[str, Any]]:
    cases = [
        ("v1-to-v2", PRODUCT, 1, 2, "v1", "v2"),
        ("v2-to-v3", PRODUCT, 2, 3, "v2", "v3"),
        ("long-product-v7-to-v9", LONG_PRODUCT, 7, 9, "v1", "v3"),
    ]
    out = []
    for name, product, from_version, to_version, from_key, to_key in cases:
        data = statement(product, from_version, to_version, from_key, to_key)
        out.append(
            {
                "name": name,
                "product": product,
                "from_version": from_version,
                "to_version": to_version,
                "from_key": from_key,
                "to_key": to_key,
                "signed_sha256": hashlib.sha256(data[:-64]).hexdigest(),
                "statement": data.hex(),
            }
        )
    return out


def invalid() -> list[dict[str, Any]]:
    """Statements a device trusting ``v1`` (product ``thermostat``) must refuse, with the device's verdict."""
    good = statement(PRODUCT, 1, 2, "v1", "v2")
    p = len(PRODUCT)
    forged_signed = signed_part(PRODUCT, 1, 2, "v1", "attacker")
    swapped = bytearray(good)
    swapped[46 + p : 78 + p] = key_id("attacker")
    swapped[80 + p : 80 + p + 91] = spki("attacker")
    cases = [
        ("wrong-magic", b"FKSP" + good[4:], "malformed"),
        ("format-version-2", good[:4] + b"\x02" + good[5:], "malformed"),
        ("truncated", good[:-1], "malformed"),
        ("trailing-byte", good + b"\x00", "malformed"),
        ("versions-not-increasing", signed_part(PRODUCT, 2, 2, "v1", "v2") + bytes(64), "malformed"),
        ("other-product", statement("doorbell", 1, 2, "v1", "v2"), "wrong_product"),
        ("signer-not-trusted", statement(PRODUCT, 2, 3, "v2", "v3"), "untrusted_signer"),
        ("attacker-key-claims-v1", forged_signed + sign("attacker", forged_signed), "bad_signature"),
        ("to-key-swapped", bytes(swapped), "bad_signature"),
        ("signature-flipped", good[:-1] + bytes([good[-1] ^ 1]), "bad_signature"),
    ]
    return [{"name": n, "statement": data.hex(), "device_verdict": verdict} for n, data, verdict in cases]


def render() -> str:
    keys = {
        name: {"file": key_path(name).name, "spki": spki(name).hex(), "key_id": key_id(name).hex()}
        for name in KEYS
    }
    document = {
        "description": "FKRS v1 rollover statements (docs/manifest-key-rollover.md); TEST keys only",
        "keys": keys,
        "valid": valid(),
        "chain": {
            "product": PRODUCT,
            "trusted": "v1",
            "statements": ["v1-to-v2", "v2-to-v3"],
            "result": "v3",
        },
        "invalid": invalid(),
    }
    return json.dumps(document, indent=2) + "\n"


def new_keys() -> None:
    for name in KEYS:
        if key_path(name).exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        key_path(name).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--new-keys", action="store_true", help="generate the key files that are missing")
    args = parser.parse_args(argv)
    if args.new_keys:
        new_keys()
    path = HERE / "vectors.json"
    text = render()
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"out of date: {path.name}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
