"""A streaming FKSP v1 decoder, written as a device would run it (``docs/sealed-payload-v1.md``).

This is the specification's second, independent implementation: it shares no code with the service's
encoder (``kms.domain.sealed``) and imports nothing from ``kms``. It follows the spec's "Decoding on a
device" steps in order and stops at the first failure with that step's verdict:

1. header rules (``bad_header``);
2. trusted key id and ECDSA P-256 signature over SHA-256(Header || Manifest) (``bad_signature``);
3. manifest rules (``bad_header``), device id (``wrong_device``), chip id (``wrong_chip``), anti-rollback
   floor (``downgrade``);
4. payload key = HMAC-SHA256(eFuse secret, info || 0x01), computed by ``DeviceContext.efuse_hmac`` so the
   decoder never holds the secret;
5. each segment read whole into one buffer, its tag checked, and only then its plaintext handed to the sink
   (``bad_segment``, ``truncated``, ``trailing_data``);
6. SHA-256 of all plaintext against the manifest (``bad_image_digest``).

Input ending anywhere before the end of the last segment, including inside the header, manifest or
signature, is ``truncated``. Memory is constant: the 384-byte preamble and one buffer of S + 16 bytes.

The three primitives a device needs are public so that external vectors (Wycheproof, RFCs) exercise exactly
the code the decoder runs: ``hmac_sha256``, ``verify_p256_signature`` and ``aes256gcm_open``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HEADER_LEN, MANIFEST_LEN, SIGNATURE_LEN = 64, 256, 64
PREAMBLE_LEN = HEADER_LEN + MANIFEST_LEN + SIGNATURE_LEN
TAG_LEN, NONCE_LEN, KEY_LEN = 16, 12, 32
MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE = 256, 1 << 20
KEY_LABEL = b"FKSP/1 payload key"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

_HEADER = struct.Struct("<4sBBHIIQII32s")
_MANIFEST_HEAD = struct.Struct("<32sQIHH")

Chunk = bytes | bytearray | memoryview


class Verdict(enum.Enum):
    """The spec's verdicts; the value is the name both reference decoders and the tests use."""

    OK = "ok"
    BAD_HEADER = "bad_header"
    BAD_SIGNATURE = "bad_signature"
    WRONG_DEVICE = "wrong_device"
    WRONG_CHIP = "wrong_chip"
    DOWNGRADE = "downgrade"
    BAD_SEGMENT = "bad_segment"
    TRUNCATED = "truncated"
    TRAILING_DATA = "trailing_data"
    BAD_IMAGE_DIGEST = "bad_image_digest"


class PayloadRejected(Exception):
    """The payload failed a check; ``verdict`` says which (never ``Verdict.OK``), ``detail`` where."""

    def __init__(self, verdict: Verdict, detail: str) -> None:
        super().__init__(f"{verdict.value}: {detail}")
        self.verdict = verdict
        self.detail = detail


@dataclass(frozen=True)
class DecodedManifest:
    """The authenticated manifest, with the layout the header gave. Strings stay raw bytes."""

    image_sha256: bytes
    image_size: int
    secure_version: int
    chip_id: int
    device_id: bytes
    product: bytes
    version: bytes
    release_time: int
    segment_size: int
    segment_count: int
    key_id: bytes


@dataclass(frozen=True)
class DeviceContext:
    """What a device knows: who it is, which manifest keys it trusts (by key id), its floor, its HMAC."""

    device_id: bytes
    chip_id: int
    floor: int
    manifest_keys: Mapping[bytes, ec.EllipticCurvePublicKey]
    efuse_hmac: Callable[[bytes], bytes] = field(repr=False)


class Sink(Protocol):
    """Where authenticated plaintext goes (the inactive OTA slot)."""

    def begin(self, manifest: DecodedManifest) -> None:
        """Called once, after steps 1-3 passed and before any plaintext is written."""

    def write(self, offset: int, plaintext: bytes) -> None:
        """Called once per segment, in order, only after the segment's tag verified."""


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256, as ``esp_hmac_calculate`` computes it (or firmware, on chips without the peripheral)."""
    return hmac.digest(key, message, "sha256")


def verify_p256_signature(public_key: ec.EllipticCurvePublicKey, digest: bytes, signature: bytes) -> bool:
    """True if ``signature`` (r || s, 32 bytes each, big-endian) signs the SHA-256 ``digest``."""
    if len(signature) != 64 or len(digest) != 32 or not isinstance(public_key.curve, ec.SECP256R1):
        return False
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not (0 < r < P256_ORDER and 0 < s < P256_ORDER):
        return False
    try:
        public_key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


def aes256gcm_open(key: bytes, nonce: bytes, sealed: Chunk, associated_data: bytes = b"") -> bytes | None:
    """Decrypt ``ciphertext || tag`` (16-byte tag); None if the tag fails.

    Only what the format uses is accepted: a 32-byte key and a 12-byte nonce (other nonce lengths go
    through GHASH and are refused with ``ValueError``).
    """
    if len(key) != KEY_LEN:
        raise ValueError(f"AES-256-GCM takes a {KEY_LEN}-byte key, not {len(key)}")
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"the nonce must be {NONCE_LEN} bytes, not {len(nonce)}")
    if len(sealed) < TAG_LEN:
        return None
    try:
        return AESGCM(key).decrypt(nonce, sealed, associated_data)
    except InvalidTag:
        return None


def manifest_key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the key's DER SubjectPublicKeyInfo (uncompressed point): the header's key id."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def segment_nonce(i: int, last: bool) -> bytes:
    return bytes(7) + i.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def payload_key_info(device_id: bytes, image_sha256: bytes, header_manifest_sha256: bytes) -> bytes:
    """The spec's HKDF info (without the block counter)."""
    return KEY_LABEL + b"\x00" + bytes([len(device_id)]) + device_id + image_sha256 + header_manifest_sha256


def decode_stream(source: Iterable[Chunk] | Chunk, device: DeviceContext, sink: Sink) -> DecodedManifest:
    """Decode one payload arriving as chunks of any size; raise ``PayloadRejected`` unless it is valid.

    Returns the authenticated manifest when every step passed (verdict ``ok``). Exceptions from the source
    or the sink (a power cut, a flash error) propagate unchanged: they are not verdicts.
    """
    chunks: Iterable[Chunk] = (source,) if isinstance(source, bytes | bytearray | memoryview) else source
    reader = _Reader(chunks)
    preamble = bytearray(PREAMBLE_LEN)
    view = memoryview(preamble)
    if reader.fill(view[:HEADER_LEN]) < HEADER_LEN:
        raise PayloadRejected(Verdict.TRUNCATED, "input ended inside the header")
    segment_size, segment_count, image_size, key_id = _check_header(bytes(view[:HEADER_LEN]))
    if reader.fill(view[HEADER_LEN:]) < PREAMBLE_LEN - HEADER_LEN:
        raise PayloadRejected(Verdict.TRUNCATED, "input ended inside the manifest or signature")
    signed_digest = hashlib.sha256(view[: HEADER_LEN + MANIFEST_LEN]).digest()
    public_key = device.manifest_keys.get(key_id)
    if public_key is None:
        raise PayloadRejected(Verdict.BAD_SIGNATURE, f"no trusted manifest key has id {key_id.hex()}")
    if not verify_p256_signature(public_key, signed_digest, bytes(view[HEADER_LEN + MANIFEST_LEN :])):
        raise PayloadRejected(Verdict.BAD_SIGNATURE, "the manifest signature does not verify")
    manifest = _check_manifest(
        bytes(view[HEADER_LEN : HEADER_LEN + MANIFEST_LEN]),
        device,
        segment_size,
        segment_count,
        image_size,
        key_id,
    )
    key = device.efuse_hmac(
        payload_key_info(manifest.device_id, manifest.image_sha256, signed_digest) + b"\x01"
    )
    sink.begin(manifest)
    image_hash = hashlib.sha256()
    buffer = memoryview(bytearray(segment_size + TAG_LEN))
    for i in range(segment_count):
        last = i == segment_count - 1
        plain_len = image_size - i * segment_size if last else segment_size
        sealed = buffer[: plain_len + TAG_LEN]
        if reader.fill(sealed) < len(sealed):
            raise PayloadRejected(Verdict.TRUNCATED, f"input ended inside segment {i} of {segment_count}")
        plaintext = aes256gcm_open(key, segment_nonce(i, last), sealed)
        if plaintext is None:
            raise PayloadRejected(Verdict.BAD_SEGMENT, f"segment {i} failed its authentication tag")
        sink.write(i * segment_size, plaintext)
        image_hash.update(plaintext)
    if not reader.at_end():
        raise PayloadRejected(Verdict.TRAILING_DATA, "input continues after the last segment")
    if image_hash.digest() != manifest.image_sha256:
        raise PayloadRejected(Verdict.BAD_IMAGE_DIGEST, "the image's SHA-256 differs from the manifest's")
    return manifest


def _check_header(raw: bytes) -> tuple[int, int, int, bytes]:
    magic, version, suite, header_len, size_s, count, image_size, manifest_len, signature_len, key_id = (
        _HEADER.unpack(raw)
    )
    problems = (
        (magic != b"FKSP", f"magic is {magic.hex()}"),
        (version != 1, f"format version {version}"),
        (suite != 1, f"suite {suite}"),
        (header_len != HEADER_LEN, f"header length {header_len}"),
        (manifest_len != MANIFEST_LEN, f"manifest length {manifest_len}"),
        (signature_len != SIGNATURE_LEN, f"signature length {signature_len}"),
        (not MIN_SEGMENT_SIZE <= size_s <= MAX_SEGMENT_SIZE, f"segment size {size_s}"),
        (image_size < 1, "image size 0"),
        (image_size >= 1 and count != -(-image_size // size_s), f"segment count {count}"),
    )
    for failed, what in problems:
        if failed:
            raise PayloadRejected(Verdict.BAD_HEADER, f"header: {what}")
    return size_s, count, image_size, key_id


def _check_manifest(
    raw: bytes, device: DeviceContext, segment_size: int, segment_count: int, image_size: int, key_id: bytes
) -> DecodedManifest:
    image_sha256, manifest_size, secure_version, chip_id, reserved = _MANIFEST_HEAD.unpack_from(raw)
    fields = {}
    for name, length_at, size, minimum, printable in (
        ("device id", 48, 64, 1, True),
        ("product", 113, 63, 1, True),
        ("version", 177, 32, 0, False),
    ):
        length = raw[length_at]
        start = length_at + 1
        value, padding = raw[start : start + length], raw[start + length : start + size]
        if not minimum <= length <= size or any(padding):
            raise PayloadRejected(Verdict.BAD_HEADER, f"manifest: {name} length or padding")
        if printable and not all(0x20 <= byte <= 0x7E for byte in value):
            raise PayloadRejected(Verdict.BAD_HEADER, f"manifest: {name} is not printable ASCII")
        fields[name] = value
    if reserved or any(raw[218:]):
        raise PayloadRejected(Verdict.BAD_HEADER, "manifest: reserved bytes are not zero")
    if manifest_size != image_size:
        raise PayloadRejected(Verdict.BAD_HEADER, "manifest: image size differs from the header's")
    if fields["device id"] != device.device_id:
        raise PayloadRejected(Verdict.WRONG_DEVICE, f"payload is for device {fields['device id']!r}")
    if chip_id != device.chip_id:
        raise PayloadRejected(Verdict.WRONG_CHIP, f"payload is for chip id {chip_id:#06x}")
    if secure_version < device.floor:
        raise PayloadRejected(Verdict.DOWNGRADE, f"secure_version {secure_version} < floor {device.floor}")
    (release_time,) = struct.unpack_from("<Q", raw, 210)
    return DecodedManifest(
        image_sha256=image_sha256,
        image_size=image_size,
        secure_version=secure_version,
        chip_id=chip_id,
        device_id=fields["device id"],
        product=fields["product"],
        version=fields["version"],
        release_time=release_time,
        segment_size=segment_size,
        segment_count=segment_count,
        key_id=key_id,
    )


class _Reader:
    """Copies exactly the bytes asked for out of a stream of chunks of any size, without buffering more."""

    def __init__(self, chunks: Iterable[Chunk]) -> None:
        self._chunks: Iterator[Chunk] = iter(chunks)
        self._current = memoryview(b"")

    def _next_chunk(self) -> bool:
        while not self._current:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            self._current = memoryview(chunk).cast("B")
        return True

    def fill(self, target: memoryview) -> int:
        """Fill ``target``; return how many bytes arrived (fewer only at the end of the input)."""
        filled = 0
        while filled < len(target) and self._next_chunk():
            take = min(len(self._current), len(target) - filled)
            target[filled : filled + take] = self._current[:take]
            self._current = self._current[take:]
            filled += take
        return filled

    def at_end(self) -> bool:
        return not self._next_chunk()
