"""Regenerate ``ecies_p256.json``: ``python -m tests.vectors.esp_encrypted_img.generate`` from the repo root.

Every value is computed here with raw ``cryptography`` calls, following the format as read from Espressif's
component and tool (see README.md), not through ``kms.domain.esp_encrypted_img``:

- device key: ``hashlib.pbkdf2_hmac`` over the eFuse secret;
- payload: one-shot ``AESGCM(key).encrypt(iv16, image, None)``, header assembled field by field;
- GCM counter: J0 + 1 recovered by ECB-decrypting the first keystream block (not by GHASH);
- inputs: the derivation rule re-implemented from its description.

Only at the end is the module asked to agree; the script stops if it does not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kms.domain import esp_encrypted_img

OUT = Path(__file__).with_name("ecies_p256.json")
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
PBKDF2_SALT = bytes.fromhex("0e2160642dae76d33448e43d7720123d9f3b1eceb88e573a4e8f7fb94ff0c869")
LABEL = b"firmware-kms esp_encrypted_img ECIES-P256 inputs v1"

Vector = dict[str, object]


def _h(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _device(secret: bytes) -> tuple[bytes, bytes, ec.EllipticCurvePublicKey]:
    scalar = int.from_bytes(hashlib.pbkdf2_hmac("sha256", secret, PBKDF2_SALT, 2048, 32), "big")
    assert 0 < scalar < N
    public = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    sec1 = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return sec1, der, public


def _keys(scalar: bytes, salt: bytes, public: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes, bytes]:
    """(shared x, AES key, ephemeral X || Y)."""
    ephemeral = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
    shared = ephemeral.exchange(ec.ECDH(), public)
    key = HKDF(hashes.SHA256(), 32, salt, b"_esp_enc_img_ecc").derive(shared)
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return shared, key, point[1:]


def _j0_low32(key: bytes, iv: bytes) -> int:
    keystream = AESGCM(key).encrypt(iv, bytes(16), None)[:16]
    ecb = Cipher(algorithms.AES(key), modes.ECB()).decryptor()  # noqa: S305 - recovers a counter block
    return (int.from_bytes(ecb.update(keystream) + ecb.finalize(), "big") - 1) & 0xFFFFFFFF


def _derive(
    seed: bytes, device_key: bytes, digest: bytes, size: int, public: ec.EllipticCurvePublicKey
) -> tuple[bytes, bytes, bytes, int]:
    block: Callable[[int, int], bytes] = lambda purpose, counter: hmac.digest(  # noqa: E731
        seed, LABEL + b"\x00" + bytes([purpose, counter]) + device_key + digest, "sha256"
    )
    scalar = (int.from_bytes(block(1, 0) + block(1, 1), "big") % (N - 1) + 1).to_bytes(32, "big")
    salt = block(2, 0)
    _, key, _ = _keys(scalar, salt, public)
    blocks = -(-size // 16)
    for counter in range(256):
        iv = block(3, counter)[:16]
        if _j0_low32(key, iv) + blocks <= 0xFFFFFFFF:
            return scalar, salt, iv, counter
    raise AssertionError("no IV candidate")


def _payload(image: bytes, scalar: bytes, salt: bytes, iv: bytes, public: ec.EllipticCurvePublicKey) -> bytes:
    _, key, point = _keys(scalar, salt, public)
    sealed = AESGCM(key).encrypt(iv, image, None)
    header = b"".join(
        (
            (0x0788B6CF).to_bytes(4, "little"),
            point,
            salt,
            bytes(288),
            iv,
            len(image).to_bytes(4, "little"),
            sealed[-16:],
            bytes(88),
        )
    )
    assert len(header) == 512
    return header + sealed[:-16]


def _image(size: int, label: str) -> bytes:
    return b"".join(_h(f"{label}/{i}") for i in range(-(-size // 32)))[:size]


def _vector(
    name: str,
    kind: str,
    secret: bytes,
    *,
    seed: bytes | None,
    image: bytes | None,
    size: int,
    digest: bytes,
    inputs: tuple[bytes, bytes, bytes],
    candidate: int | None,
) -> Vector:
    sec1, der, public = _device(secret)
    scalar, salt, iv = inputs
    shared, key, point = _keys(scalar, salt, public)
    return {
        "name": name,
        "kind": kind,
        "device_secret": secret.hex(),
        "device_public_key": sec1.hex(),
        "device_public_key_der": der.hex(),
        "seed": seed.hex() if seed else None,
        "image": image.hex() if image is not None else None,
        "image_size": size,
        "image_sha256": digest.hex(),
        "iv_candidate": candidate,
        "ephemeral_private_scalar": scalar.hex(),
        "hkdf_salt": salt.hex(),
        "iv": iv.hex(),
        "ephemeral_public_key_xy": point.hex(),
        "shared_secret_x": shared.hex(),
        "aes_key": key.hex(),
        "payload": _payload(image, scalar, salt, iv, public).hex() if image is not None else None,
    }


def build() -> list[Vector]:
    devices = {name: _h(f"firmware-kms esp_encrypted_img test device {name}") for name in ("a", "b")}
    vectors = []
    for i, (name, size) in enumerate([("a", 1), ("a", 15), ("a", 16), ("a", 17), ("b", 100), ("b", 4099)]):
        secret = devices[name]
        sec1, _, public = _device(secret)
        image = _image(size, f"image {i}")
        digest = hashlib.sha256(image).digest()
        seed = _h(f"firmware-kms esp_encrypted_img test seed {i}")
        scalar, salt, iv, candidate = _derive(seed, sec1, digest, size, public)
        vectors.append(
            _vector(
                f"derived-{name}-{size}",
                "derived",
                secret,
                seed=seed,
                image=image,
                size=size,
                digest=digest,
                inputs=(scalar, salt, iv),
                candidate=candidate,
            )
        )
    for name, value in (("explicit-scalar-1", 1), ("explicit-scalar-n-1", N - 1)):
        image = _image(33, name)
        vectors.append(
            _vector(
                name,
                "explicit",
                devices["b"],
                seed=None,
                image=image,
                size=33,
                digest=hashlib.sha256(image).digest(),
                inputs=(value.to_bytes(32, "big"), b"\x5a" * 32, bytes(range(16))),
                candidate=None,
            )
        )
    # derivation only, at the largest bin_size, for the first seed whose first IV candidate wraps
    sec1, _, public = _device(devices["a"])
    digest = _h("a 4 GiB - 1 image that is never built")
    for j in range(1000):
        seed = _h(f"firmware-kms esp_encrypted_img wrap seed {j}")
        scalar, salt, iv, candidate = _derive(seed, sec1, digest, 0xFFFFFFFF, public)
        if candidate > 0:
            break
    vectors.append(
        _vector(
            f"derivation-only-iv-candidate-{candidate}",
            "derivation_only",
            devices["a"],
            seed=seed,
            image=None,
            size=0xFFFFFFFF,
            digest=digest,
            inputs=(scalar, salt, iv),
            candidate=candidate,
        )
    )
    return vectors


def _check_module_agrees(vectors: list[Vector]) -> None:
    for v in vectors:
        texts = {k: x for k, x in v.items() if isinstance(x, str) and k not in ("name", "kind")}
        hexes = {k: bytes.fromhex(x) for k, x in texts.items()}
        size = v["image_size"]
        assert isinstance(size, int)
        if "seed" in hexes:
            got = esp_encrypted_img.derive_encryption_inputs(
                hexes["seed"], hexes["device_public_key"], hexes["image_sha256"], size
            )
            assert (got.ephemeral_private_scalar, got.hkdf_salt, got.iv) == (
                hexes["ephemeral_private_scalar"],
                hexes["hkdf_salt"],
                hexes["iv"],
            ), v["name"]
        if "payload" in hexes:
            built = esp_encrypted_img.encrypt_for_device(
                hexes["image"],
                hexes["device_public_key"],
                hexes["ephemeral_private_scalar"],
                hexes["hkdf_salt"],
                hexes["iv"],
            )
            assert built == hexes["payload"], v["name"]


def main() -> None:
    vectors = build()
    _check_module_agrees(vectors)
    document = {
        "description": "esp_encrypted_img ECIES-P256 payloads (component v2.4+); see README.md. Hex strings.",
        "format": (
            "header 512 bytes: magic u32 LE 0x0788b6cf | ephemeral X||Y big-endian (64) | HKDF salt (32) | "
            "288 zero | IV (16) | bin_size u32 LE | tag (16) | 88 zero; then AES-256-GCM ciphertext"
        ),
        "vectors": vectors,
    }
    OUT.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {len(vectors)} vectors to {OUT}")


if __name__ == "__main__":
    main()
