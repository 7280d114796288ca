"""The FKSP v1 tamper matrix, shared by the Python device model tests and the C decoder tests.

``tamper_cases(payload, ...)`` derives damaged payloads from one good payload and gives each the verdict the
spec's decoding order ("Decoding on a device", steps 1-6) demands. The expected verdict of a derived payload
is computed, not guessed, by ``expected_verdict``: the spec's steps with the cryptography taken as ideal (a
changed signed byte fails the signature, a changed or misplaced segment fails its tag). So a header byte
flip that still leaves a well-formed header (say, segment size 256 -> 257 when the count stays 4) is
``bad_signature``, and one that breaks a step-1 rule is ``bad_header``.

The standard context (``standard_context()``), used by both decoders' tests:

- device secret ``SHA-256("FKSP tamper matrix device secret")``, device id ``tamper-device-0001``, chip id
  ``0x0009`` (ESP32-S3), anti-rollback floor 3;
- manifest key: P-256 scalar ``SHA-256("FKSP tamper matrix manifest key") mod n`` (a TEST key), trusted by
  the device; signatures are deterministic (RFC 6979) so every run builds the same bytes;
- image: 868 bytes (3 x 256 + 100), ``SHA-256("FKSP tamper image" || i as 4 bytes big-endian)`` blocks,
  i = 0, 1, ...; segment size 256, so 4 segments, the last one short;
- manifest: product ``thermostat``, version ``1.4.2``, release time 1767225600, secure_version 5;
- ``other_device_payload``: the same release sealed for ``tamper-device-0002`` (with that device's secret,
  ``SHA-256("FKSP tamper matrix other device secret")``); ``downgrade_payload``: the same image for this
  device with secure_version 2.

``signed_edge_cases(context)`` adds payloads that only the signer could make (a correctly signed manifest
that breaks a manifest rule, another chip, an image digest that does not match, an untrusted key).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.domain import sealed

TAG_LEN = 16
_HEADER = struct.Struct("<4sBBHIIQII32s")
# name, offset, size of each header field (spec: Header).
HEADER_FIELDS = (
    ("magic", 0, 4),
    ("format_version", 4, 1),
    ("suite", 5, 1),
    ("header_length", 6, 2),
    ("segment_size", 8, 4),
    ("segment_count", 12, 4),
    ("image_size", 16, 8),
    ("manifest_length", 24, 4),
    ("signature_length", 28, 4),
    ("manifest_key_id", 32, 32),
)
# name, offset (within the manifest) of a byte to flip (spec: Manifest).
MANIFEST_BYTES = (
    ("image_sha256", 0),
    ("image_size", 32),
    ("secure_version", 40),
    ("chip_id", 44),
    ("reserved_46", 46),
    ("device_id_length", 48),
    ("device_id", 49),
    ("device_id_padding", 112),
    ("product_length", 113),
    ("product", 114),
    ("product_padding", 176),
    ("version_length", 177),
    ("version", 178),
    ("version_padding", 209),
    ("release_time", 210),
    ("reserved_218", 218),
    ("reserved_255", 255),
)


@dataclass(frozen=True)
class TamperCase:
    name: str
    payload: bytes
    verdict: str


@dataclass(frozen=True)
class StandardContext:
    """The device and payloads of the shared matrix; see the module docstring for how they are made."""

    device_secret: bytes
    device_id: str
    chip_id: int
    floor: int
    manifest_public_key_der: bytes
    manifest_key_id: bytes
    manifest_private_scalar: int
    segment_size: int
    image: bytes
    secure_version: int
    payload: bytes
    other_device_id: str
    other_device_payload: bytes
    downgrade_payload: bytes

    @property
    def image_size(self) -> int:
        return len(self.image)

    def cases(self) -> list[TamperCase]:
        """The full matrix for this context: ``tamper_cases`` plus ``signed_edge_cases``."""
        return tamper_cases(
            self.payload,
            segment_size=self.segment_size,
            image_size=self.image_size,
            other_device_payload=self.other_device_payload,
            downgrade_payload=self.downgrade_payload,
        ) + signed_edge_cases(self)


def header_is_well_formed(header: bytes) -> bool:
    """Spec step 1, stated again on its own: True if a decoder accepts these 64 bytes as a header."""
    magic, version, suite, header_len, size_s, count, image_size, manifest_len, signature_len, _ = (
        _HEADER.unpack(header)
    )
    return (
        (magic, version, suite, header_len, manifest_len, signature_len) == (b"FKSP", 1, 1, 64, 256, 64)
        and 256 <= size_s <= 1 << 20
        and image_size >= 1
        and count == math.ceil(image_size / size_s)
    )


def expected_verdict(
    candidate: bytes,
    original: bytes,
    *,
    segment_size: int,
    image_size: int,
    header_len: int = 64,
    manifest_len: int = 256,
    signature_len: int = 64,
) -> str:
    """The verdict a decoder must give ``candidate``, a payload derived from the good payload ``original``."""
    preamble = header_len + manifest_len + signature_len
    if len(candidate) < header_len:
        return "truncated"
    if candidate[:header_len] != original[:header_len]:
        if not header_is_well_formed(candidate[:header_len]):
            return "bad_header"
        return "truncated" if len(candidate) < preamble else "bad_signature"
    if len(candidate) < preamble:
        return "truncated"
    if candidate[header_len:preamble] != original[header_len:preamble]:
        return "bad_signature"
    position = preamble
    for length in _sealed_lengths(segment_size, image_size):
        if len(candidate) - position < length:
            return "truncated"
        if candidate[position : position + length] != original[position : position + length]:
            return "bad_segment"
        position += length
    return "trailing_data" if len(candidate) > position else "ok"


def tamper_cases(
    payload: bytes,
    *,
    header_len: int = 64,
    manifest_len: int = 256,
    signature_len: int = 64,
    segment_size: int,
    image_size: int,
    other_device_payload: bytes,
    downgrade_payload: bytes,
) -> list[TamperCase]:
    """Every damaged variant of ``payload`` with its verdict; ``payload`` itself is the case ``ok``."""
    preamble = header_len + manifest_len + signature_len
    lengths = _sealed_lengths(segment_size, image_size)
    starts = [preamble + sum(lengths[:i]) for i in range(len(lengths))]
    if len(payload) != preamble + sum(lengths):
        raise ValueError("the payload's length does not match segment_size and image_size")
    segments = [payload[start : start + length] for start, length in zip(starts, lengths, strict=True)]
    prefix, last = payload[:preamble], len(segments) - 1
    derived: list[tuple[str, bytes]] = [("ok", payload)]

    for name, offset, size in HEADER_FIELDS:
        for at in sorted({offset, offset + size - 1}):
            derived.append((f"flip header.{name} byte {at}", _flip(payload, at)))
    for name, offset in MANIFEST_BYTES:
        derived.append((f"flip manifest.{name} byte {offset}", _flip(payload, header_len + offset)))
    for at in (0, 31, 32, 63):
        derived.append((f"flip signature byte {at}", _flip(payload, header_len + manifest_len + at)))
    for i, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        derived.append((f"flip segment {i} ciphertext first byte", _flip(payload, start)))
        derived.append(
            (f"flip segment {i} ciphertext last byte", _flip(payload, start + length - TAG_LEN - 1))
        )
        derived.append((f"flip segment {i} tag first byte", _flip(payload, start + length - TAG_LEN)))
        derived.append((f"flip segment {i} tag last byte", _flip(payload, start + length - 1)))

    cuts = {0, 1, header_len // 2, header_len - 1, header_len, header_len + manifest_len // 2}
    cuts |= {header_len + manifest_len, preamble - 1, preamble, len(payload) - TAG_LEN, len(payload) - 1}
    for start, length in zip(starts, lengths, strict=True):
        cuts |= {start, start + length // 2, start + length - TAG_LEN}
    for cut in sorted(cuts - {len(payload)}):
        derived.append((f"truncate to {cut} bytes", payload[:cut]))

    def body(order: list[bytes]) -> bytes:
        return prefix + b"".join(order)

    if len(segments) >= 2:
        derived.append(("swap segments 0 and 1", body([segments[1], segments[0], *segments[2:]])))
        swapped_end = [*segments[:-2], segments[-1], segments[-2]]
        derived.append((f"swap segments {last - 1} and {last}", body(swapped_end)))
        derived.append(("drop segment 0", body(segments[1:])))
        derived.append((f"drop segment {last}", body(segments[:-1])))
    if len(segments) >= 3:
        derived.append(("drop segment 1", body([segments[0], *segments[2:]])))
    derived.append(("duplicate segment 0", body([segments[0], *segments])))
    derived.append((f"duplicate segment {last}", body([*segments, segments[-1]])))
    derived.append(("trailing zero byte", payload + b"\x00"))
    derived.append(("trailing copy of the payload", payload + payload))
    if len(other_device_payload) == len(payload):
        foreign = other_device_payload[preamble : preamble + lengths[0]]
        derived.append(("segment 0 from the other device's payload", body([foreign, *segments[1:]])))

    cases = [
        TamperCase(
            name,
            data,
            expected_verdict(
                data,
                payload,
                segment_size=segment_size,
                image_size=image_size,
                header_len=header_len,
                manifest_len=manifest_len,
                signature_len=signature_len,
            ),
        )
        for name, data in derived
    ]
    cases.append(TamperCase("payload for another device", other_device_payload, "wrong_device"))
    cases.append(
        TamperCase(
            "other device's header, manifest and signature before this body",
            other_device_payload[:preamble] + payload[preamble:],
            "wrong_device",
        )
    )
    cases.append(TamperCase("signed downgrade below the floor", downgrade_payload, "downgrade"))
    return cases


def signed_edge_cases(context: StandardContext) -> list[TamperCase]:
    """Payloads signed by the trusted key (or another) that break a rule of steps 2, 3 or 6."""
    key = _private_key(context.manifest_private_scalar)
    original = context.payload
    cases: list[TamperCase] = []
    for name, offset, value in (
        ("signed manifest with reserved byte 46 set", 46, b"\x01"),
        ("signed manifest with reserved byte 218 set", 218, b"\x01"),
        ("signed manifest with device id padding set", 49 + len(context.device_id), b"X"),
        ("signed manifest with device id length 0", 48, b"\x00"),
        ("signed manifest with product length 64", 113, b"\x40"),
        ("signed manifest with version length 33", 177, b"\x21"),
        ("signed manifest with a control character in the device id", 49, b"\x07"),
        ("signed manifest with an image size other than the header's", 32, bytes([original[64 + 32] ^ 1])),
    ):
        cases.append(TamperCase(name, _resign(original, key, 64 + offset, value), "bad_header"))
    cases.append(TamperCase("payload for another chip", _build(context, chip_id=0x000D), "wrong_chip"))
    cases.append(
        TamperCase("image digest that does not match", _sealed_with_wrong_digest(context), "bad_image_digest")
    )
    untrusted = _private_key(int.from_bytes(hashlib.sha256(b"FKSP untrusted key").digest(), "big"))
    cases.append(TamperCase("signed by an untrusted key", _build(context, signer=untrusted), "bad_signature"))
    wrong_signer = _build(context, signer=untrusted, key_id=context.manifest_key_id)
    cases.append(TamperCase("trusted key id, untrusted signer", wrong_signer, "bad_signature"))
    return cases


@functools.cache
def standard_context() -> StandardContext:
    """The shared device context and payloads (deterministic; built with ``kms.domain.sealed``)."""
    n = int.from_bytes(
        bytes.fromhex("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551"), "big"
    )
    scalar = int.from_bytes(hashlib.sha256(b"FKSP tamper matrix manifest key").digest(), "big") % n
    public_der = _public_der(_private_key(scalar))
    image = _image(b"FKSP tamper image", 868)
    base = StandardContext(
        device_secret=hashlib.sha256(b"FKSP tamper matrix device secret").digest(),
        device_id="tamper-device-0001",
        chip_id=0x0009,
        floor=3,
        manifest_public_key_der=public_der,
        manifest_key_id=hashlib.sha256(public_der).digest(),
        manifest_private_scalar=scalar,
        segment_size=256,
        image=image,
        secure_version=5,
        payload=b"",
        other_device_id="tamper-device-0002",
        other_device_payload=b"",
        downgrade_payload=b"",
    )
    other_secret = hashlib.sha256(b"FKSP tamper matrix other device secret").digest()
    return dataclasses.replace(
        base,
        payload=_build(base),
        other_device_payload=_build(base, device_id=base.other_device_id, secret=other_secret),
        downgrade_payload=_build(base, secure_version=2),
    )


def build_payload(
    *,
    secret: bytes,
    device_id: str,
    chip_id: int,
    secure_version: int,
    image: bytes,
    segment_size: int,
    signer: ec.EllipticCurvePrivateKey,
    key_id: bytes | None = None,
    product: str = "thermostat",
    version: str = "1.4.2",
    release_time: int = 1767225600,
) -> bytes:
    """A whole payload through ``kms.domain.sealed``, signed in software (RFC 6979) instead of the HSM."""
    header = sealed.SealedHeader(segment_size, len(image), key_id or _key_id(signer))
    manifest = sealed.Manifest(
        image_sha256=hashlib.sha256(image).digest(),
        image_size=len(image),
        secure_version=secure_version,
        chip_id=chip_id,
        device_id=device_id,
        product=product,
        version=version,
        release_time=release_time,
    )
    signed = sealed.signed_bytes(header, manifest)
    key = sealed.hkdf_expand_one_block(secret, sealed.key_derivation_info(manifest, signed))
    payload = sealed.SealedPayload(header, manifest, sign_raw(signer, signed), key, image)
    return b"".join(payload.iter_bytes())


def sign_raw(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA P-256 over SHA-256(message), deterministic (RFC 6979), as r || s big-endian."""
    digest = hashlib.sha256(message).digest()
    der = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _build(
    context: StandardContext,
    *,
    device_id: str | None = None,
    secret: bytes | None = None,
    chip_id: int | None = None,
    secure_version: int | None = None,
    signer: ec.EllipticCurvePrivateKey | None = None,
    key_id: bytes | None = None,
) -> bytes:
    return build_payload(
        secret=context.device_secret if secret is None else secret,
        device_id=device_id or context.device_id,
        chip_id=context.chip_id if chip_id is None else chip_id,
        secure_version=context.secure_version if secure_version is None else secure_version,
        image=context.image,
        segment_size=context.segment_size,
        signer=signer or _private_key(context.manifest_private_scalar),
        key_id=key_id,
    )


def _sealed_with_wrong_digest(context: StandardContext) -> bytes:
    """A payload whose segments all authenticate but whose manifest names another image's SHA-256.

    ``SealedPayload`` refuses to build this (it would be a key-reuse hazard), so it is assembled here.
    """
    image, size_s = context.image, context.segment_size
    header = sealed.SealedHeader(size_s, len(image), context.manifest_key_id)
    manifest = sealed.Manifest(
        image_sha256=hashlib.sha256(b"another image").digest(),
        image_size=len(image),
        secure_version=context.secure_version,
        chip_id=context.chip_id,
        device_id=context.device_id,
        product="thermostat",
        version="1.4.2",
        release_time=1767225600,
    )
    signed = sealed.signed_bytes(header, manifest)
    key = sealed.hkdf_expand_one_block(context.device_secret, sealed.key_derivation_info(manifest, signed))
    aead, count = AESGCM(key), header.segment_count
    body = b"".join(
        aead.encrypt(sealed.nonce(i, i == count - 1), image[i * size_s : (i + 1) * size_s], None)
        for i in range(count)
    )
    return signed + sign_raw(_private_key(context.manifest_private_scalar), signed) + body


def _resign(payload: bytes, key: ec.EllipticCurvePrivateKey, at: int, value: bytes) -> bytes:
    signed = bytearray(payload[:320])
    signed[at : at + len(value)] = value
    return bytes(signed) + sign_raw(key, bytes(signed)) + payload[384:]


def _sealed_lengths(segment_size: int, image_size: int) -> list[int]:
    count = math.ceil(image_size / segment_size)
    return [segment_size + TAG_LEN] * (count - 1) + [image_size - (count - 1) * segment_size + TAG_LEN]


def _flip(payload: bytes, at: int) -> bytes:
    out = bytearray(payload)
    out[at] ^= 0x01
    return bytes(out)


def _image(seed: bytes, size: int) -> bytes:
    blocks = (hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(-(-size // 32)))
    return b"".join(blocks)[:size]


def _private_key(scalar: int) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(scalar, ec.SECP256R1())


def _public_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _key_id(key: ec.EllipticCurvePrivateKey) -> bytes:
    return hashlib.sha256(_public_der(key)).digest()
