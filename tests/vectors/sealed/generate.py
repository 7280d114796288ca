"""Regenerate the FKSP v1 test vectors in this folder, deterministically, from the inputs below.

    python tests/vectors/sealed/generate.py            # rewrite the *.json files
    python tests/vectors/sealed/generate.py --check    # exit 1 if a file differs from what it would get
    python tests/vectors/sealed/generate.py --resign   # sign afresh where a stored signature no longer fits

The encoding is written here from ``docs/sealed-payload-v1.md`` alone, independently of the service's
encoder (``kms.domain.sealed``), so the tests that compare the two catch a bug in either. ECDSA signatures
are randomized: a vector's signature is an input, read back from its existing file and checked against the
regenerated header and manifest; only a missing (or, with ``--resign``, no longer valid) one is made anew.
All keys and secrets here are TEST values; they protect nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = Path(__file__).parent
FULL_PAYLOAD_LIMIT = 16 * 1024  # payloads up to this size are stored whole, larger ones by SHA-256
PLAINTEXT_HEX_LIMIT = 4096  # images up to this size are stored as hex, larger ones as a recipe

_KEY_A = "e54c72ff614deef1a51718ef32a858d0ddcd6a73fdd792351422c8449aac3a6a"
_KEY_B = "1425b0c2eb66f1ec40757067297a3978fce46effdc09c67032af35b8001ebc47"

# name -> inputs (everything but the signature). Plaintext: {"hex": ...} or a "sha256-counter" recipe.
INPUTS: dict[str, dict[str, Any]] = {
    "small-s256": {
        "description": "1000-byte image in segments of 256: three full segments and a short last one",
        "device_secret": "1f43187a69b021062feaf5b6243da2b8ea41c06a4fc42cdbbcd0d8ed2daf358c",
        "device_id": "dev-small-01",
        "chip_id": 0x0009,
        "segment_size": 256,
        "manifest": {
            "secure_version": 1,
            "product": "thermostat",
            "version": "v1.0.0",
            "release_time": 1767225600,
        },
        "manifest_private_key_scalar": _KEY_A,
        "plaintext": {"recipe": "sha256-counter", "seed": "small-s256", "size": 1000},
    },
    "exact-multiple-s4096": {
        "description": "3 x 4096-byte image (last segment full); longest device id, product and version",
        "device_secret": "d23d44abcbceaaa43bab2509d9eb5844c4c1c8bf7785f2ef958d9e4ec653ab45",
        "device_id": "SN-0123456789abcdef0123456789abcdef0123456789abcdef~!@#$%^&*()_+",
        "chip_id": 0x000D,
        "segment_size": 4096,
        "manifest": {
            "secure_version": 16,
            "product": "p" + "roduct.name_with-63-chars" * 2 + "0123456789ab",
            "version": "v2.0.0-rc.1+build.20260101.abcde",
            "release_time": 1767225601,
        },
        "manifest_private_key_scalar": _KEY_B,
        "plaintext": {"recipe": "sha256-counter", "seed": "exact-multiple-s4096", "size": 3 * 4096},
    },
    "single-segment-s4096": {
        "description": "100-byte image, smaller than one 4096-byte segment; empty version, secure_version 0",
        "device_secret": "a3ef6e24a57375981f7ba927d214f1bae248046310246fabc6d8c4e44b99df55",
        "device_id": "c2 0000000001",
        "chip_id": 0x000C,
        "segment_size": 4096,
        "manifest": {"secure_version": 0, "product": "x", "version": "", "release_time": 0},
        "manifest_private_key_scalar": _KEY_A,
        "plaintext": {"recipe": "sha256-counter", "seed": "single-segment-s4096", "size": 100},
    },
    "multi-segment-s65536": {
        "description": "200000-byte image in segments of 64 KiB (payload stored by SHA-256 only)",
        "device_secret": "e3f5f24af2c143b09a882c1d4842f264ad47e669861edad9d5a2c34d9bb66c32",
        "device_id": "dev-large-01",
        "chip_id": 0x0017,
        "segment_size": 65536,
        "manifest": {
            "secure_version": 7,
            "product": "gateway",
            "version": "3.1.4",
            "release_time": 4102444800,
        },
        "manifest_private_key_scalar": _KEY_B,
        "plaintext": {"recipe": "sha256-counter", "seed": "multi-segment-s65536", "size": 200000},
    },
    "max-segment-s1048576": {
        "description": "1 MiB + 1 byte image in the largest segments (1 MiB): the last one holds one byte",
        "device_secret": "c719f477c774983cc1cdf356134b97b047bf6ef319b3d545679456e1bbc0fc05",
        "device_id": "dev-max-01",
        "chip_id": 0x0012,
        "segment_size": 1 << 20,
        "manifest": {
            "secure_version": 9,
            "product": "camera",
            "version": "9.9.9",
            "release_time": 1767225602,
        },
        "manifest_private_key_scalar": _KEY_A,
        "plaintext": {"recipe": "sha256-counter", "seed": "max-segment-s1048576", "size": (1 << 20) + 1},
    },
}


def plaintext(spec: dict[str, Any]) -> bytes:
    """The image: hex, or SHA-256(seed (UTF-8) || i as 4 bytes big-endian) for i = 0, 1, ... cut to size."""
    if "hex" in spec:
        return bytes.fromhex(spec["hex"])
    if spec.get("recipe") != "sha256-counter":
        raise ValueError(f"unknown plaintext recipe {spec!r}")
    seed, size = spec["seed"].encode(), spec["size"]
    return b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(-(-size // 32)))[
        :size
    ]


def private_key(scalar_hex: str) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int(scalar_hex, 16), ec.SECP256R1())


def public_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def header_bytes(segment_size: int, image_size: int, key_id: bytes) -> bytes:
    """Spec "Header": magic, version 1, suite 1, 64, S, n, size, 256, 64, key id (little-endian)."""
    count = math.ceil(image_size / segment_size)
    return struct.pack("<4sBBHIIQII32s", b"FKSP", 1, 1, 64, segment_size, count, image_size, 256, 64, key_id)


def manifest_bytes(inputs: dict[str, Any], image: bytes) -> bytes:
    """Spec "Manifest", field by field at its offset."""
    fields = inputs["manifest"]
    out = bytearray(256)
    out[0:32] = hashlib.sha256(image).digest()
    out[32:40] = len(image).to_bytes(8, "little")
    out[40:44] = fields["secure_version"].to_bytes(4, "little")
    out[44:46] = inputs["chip_id"].to_bytes(2, "little")
    for length_at, text in ((48, inputs["device_id"]), (113, fields["product"]), (177, fields["version"])):
        value = text.encode()
        out[length_at] = len(value)
        out[length_at + 1 : length_at + 1 + len(value)] = value
    out[210:218] = fields["release_time"].to_bytes(8, "little")
    return bytes(out)


def seal(inputs: dict[str, Any], signature: bytes | None) -> tuple[dict[str, Any], bytes]:
    """The vector (inputs, signature and intermediates) and the whole payload."""
    image = plaintext(inputs["plaintext"])
    key = private_key(inputs["manifest_private_key_scalar"])
    der = public_der(key)
    key_id = hashlib.sha256(der).digest()
    size_s, size = inputs["segment_size"], len(image)
    count = math.ceil(size / size_s)
    header = header_bytes(size_s, size, key_id)
    manifest = manifest_bytes(inputs, image)
    signed_digest = hashlib.sha256(header + manifest).digest()
    if signature is None:
        r, s = decode_dss_signature(key.sign(signed_digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    device_id = inputs["device_id"].encode()
    info = b"FKSP/1 payload key\x00" + bytes([len(device_id)]) + device_id + manifest[:32] + signed_digest
    payload_key = hmac.digest(bytes.fromhex(inputs["device_secret"]), info + b"\x01", "sha256")
    aead = AESGCM(payload_key)
    nonces = [bytes(7) + i.to_bytes(4, "big") + bytes([i == count - 1]) for i in range(count)]
    segments = [aead.encrypt(nonces[i], image[i * size_s : (i + 1) * size_s], None) for i in range(count)]
    payload = header + manifest + signature + b"".join(segments)
    stored_inputs = {k: v for k, v in inputs.items() if k != "description"}
    if size <= PLAINTEXT_HEX_LIMIT:
        stored_inputs["plaintext"] = {**inputs["plaintext"], "hex": image.hex()}
    intermediates: dict[str, Any] = {
        "manifest_public_key_der": der.hex(),
        "manifest_key_id": key_id.hex(),
        "image_sha256": manifest[:32].hex(),
        "image_size": size,
        "segment_count": count,
        "header": header.hex(),
        "manifest": manifest.hex(),
        "header_manifest_sha256": signed_digest.hex(),
        "info": info.hex(),
        "payload_key": payload_key.hex(),
        "first_nonce": nonces[0].hex(),
        "last_nonce": nonces[-1].hex(),
        "first_segment_tag": segments[0][-16:].hex(),
        "last_segment_tag": segments[-1][-16:].hex(),
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    if len(payload) <= FULL_PAYLOAD_LIMIT:
        intermediates["payload"] = payload.hex()
    vector = {
        "name": None,
        "description": inputs["description"],
        "inputs": {**stored_inputs, "signature": signature.hex()},
        "intermediates": intermediates,
    }
    return vector, payload


def signature_fits(inputs: dict[str, Any], signature: bytes) -> bool:
    """True if ``signature`` verifies over the header and manifest these inputs give."""
    image = plaintext(inputs["plaintext"])
    key = private_key(inputs["manifest_private_key_scalar"])
    key_id = hashlib.sha256(public_der(key)).digest()
    signed = header_bytes(inputs["segment_size"], len(image), key_id) + manifest_bytes(inputs, image)
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        key.public_key().verify(der, hashlib.sha256(signed).digest(), ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


def vector(name: str, *, resign: bool = False) -> dict[str, Any]:
    """Regenerate one vector, reusing the signature stored in its file when it still verifies."""
    inputs = INPUTS[name]
    path = HERE / f"{name}.json"
    signature: bytes | None = None
    if path.exists():
        signature = bytes.fromhex(json.loads(path.read_text())["inputs"]["signature"])
        if not signature_fits(inputs, signature):
            if not resign:
                raise SystemExit(f"{path.name}: the stored signature no longer fits the inputs; use --resign")
            signature = None
    result, _ = seal(inputs, signature)
    result["name"] = name
    return result


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--resign", action="store_true", help="sign afresh where the stored signature fails")
    args = parser.parse_args(argv)
    stale = []
    for name in INPUTS:
        path = HERE / f"{name}.json"
        text = render(vector(name, resign=args.resign))
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print("out of date:", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
