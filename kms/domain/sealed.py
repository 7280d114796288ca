"""FKSP v1 sealed payloads: one signed app image, encrypted for exactly one device.

The specification is ``docs/sealed-payload-v1.md``; this module is the service's encoder and the parser of
its own output. The device side (the decoder) lives in ``kmsctl.device`` and in ``client/device-c``.
Integers are little-endian unless marked big-endian.

Payload, ``384 + image size + 16 * n`` bytes::

    Header (64) | Manifest (256) | Signature (64) | Segment[0] | ... | Segment[n-1]

Header, 64 bytes (``SealedHeader``):

======  ====  =====================================================================================
offset  size  field
======  ====  =====================================================================================
0       4     magic ``FKSP``
4       1     format version, 1
5       1     suite, 1 (HKDF-Expand-SHA256 from the eFuse secret, AES-256-GCM, ECDSA P-256/SHA-256)
6       2     header length, 64
8       4     segment size S, 256 <= S <= 1,048,576 plaintext bytes
12      4     segment count n = ceil(image size / S), >= 1
16      8     image size, >= 1
24      4     manifest length, 256
28      4     signature length, 64
32      32    manifest key id: SHA-256 of the DER SubjectPublicKeyInfo of the signing key version
======  ====  =====================================================================================

Manifest, 256 bytes (``Manifest``); every padding and reserved byte is zero:

======  ====  =====================================================================================
offset  size  field
======  ====  =====================================================================================
0       32    image SHA-256 (of the plaintext image)
32      8     image size, equal to the header's
40      4     secure_version (anti-rollback counter)
44      2     chip id (``esp_image_header_t.chip_id``)
46      2     reserved, 0
48      1     device id length d, 1..64
49      64    device id: d bytes of printable ASCII (0x20..0x7E), then zeros
113     1     product length p, 1..63
114     63    product: p bytes of printable ASCII, then zeros
177     1     version length v, 0..32
178     32    version: v bytes (``esp_app_desc_t.version``; written UTF-8), then zeros
210     8     release time, seconds since the Unix epoch
218     38    reserved, zeros
======  ====  =====================================================================================

Signature, 64 bytes: ECDSA P-256 over SHA-256(Header || Manifest) (the 320 bytes of ``signed_bytes``),
``r || s``, each 32 bytes **big-endian**. The HSM makes it; this module only places it.

Payload key: ``K_payload = HMAC-SHA256(K_dev, info || 0x01)``, one HKDF-Expand block with PRK = the
device's 32-byte eFuse secret, where ``info`` (``key_derivation_info``) is::

    "FKSP/1 payload key" (18 ASCII bytes) | 0x00 | d (1 byte) | device id (d bytes)
        | image SHA-256 (32) | SHA-256(Header || Manifest) (32)

The service computes the HMAC in the HSM; ``hkdf_expand_one_block`` is the same computation in software
for tests and the device model.

Segment i (0 <= i < n): AES-256-GCM under ``K_payload`` of image bytes [i*S, min((i+1)*S, size)), with
empty associated data and ``nonce(i) = 0x00 * 7 | i (4 bytes, big-endian) | 0x01 if i == n-1 else 0x00``,
stored as ciphertext | tag (16 bytes).

Safety: a (key, nonce) pair must never seal two different plaintexts. The key is bound to the image's
SHA-256 through ``info``, so ``SealedPayload`` refuses an image whose SHA-256 differs from the manifest's
(hash a release's image once with ``HashedImage`` and share it between devices and resumed downloads).

Determinism: everything but the signature follows from (device, release, segment size); ECDSA is randomized,
so the caller signs a payload's header and manifest once and keeps the signature for every later request.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.domain.errors import InvalidArgument, OutOfRange

MAGIC = b"FKSP"
FORMAT_VERSION = 1
SUITE = 1
HEADER_LEN = 64
MANIFEST_LEN = 256
SIGNATURE_LEN = 64
PREFIX_LEN = HEADER_LEN + MANIFEST_LEN + SIGNATURE_LEN  # 384
TAG_LEN = 16
NONCE_LEN = 12
KEY_LEN = 32
MIN_SEGMENT_SIZE = 256
MAX_SEGMENT_SIZE = 1 << 20
DEFAULT_SEGMENT_SIZE = 4096
DEFAULT_CHUNK = 64 * 1024
MAX_DEVICE_ID_LEN = 64
MAX_PRODUCT_LEN = 63
MAX_VERSION_LEN = 32
KEY_INFO_LABEL = b"FKSP/1 payload key"

_U16, _U32, _U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
_HEADER = struct.Struct("<4sBBHIIQII32s")
_MANIFEST_FIXED = struct.Struct("<32sQIHH")  # image SHA-256 .. reserved, offsets 0..47
_RELEASE_TIME = struct.Struct("<Q")
_NONCE = struct.Struct(">7xIB")  # ``nonce(i, last)`` in one call, for the sealing loop
# (length byte offset, field offset, field size) of the three length-prefixed fields.
_DEVICE_ID = (48, 49, MAX_DEVICE_ID_LEN)
_PRODUCT = (113, 114, MAX_PRODUCT_LEN)
_VERSION = (177, 178, MAX_VERSION_LEN)
_RELEASE_TIME_OFFSET = 210
_RESERVED_TAIL = 218


def _check_uint(name: str, value: int, maximum: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise InvalidArgument(f"{name} must be an integer in {minimum}..{maximum}, not {value!r}")


def _is_printable_ascii(data: bytes) -> bool:
    return all(0x20 <= byte <= 0x7E for byte in data)


@dataclass(frozen=True)
class SealedHeader:
    """The 64-byte header. ``segment_count`` follows from the sizes; the constants are not fields."""

    segment_size: int
    image_size: int
    manifest_key_id: bytes

    def __post_init__(self) -> None:
        _check_uint("segment size", self.segment_size, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE)
        _check_uint("image size", self.image_size, _U64, 1)
        if self.segment_count > _U32:
            raise InvalidArgument(
                f"an image of {self.image_size} bytes needs {self.segment_count} segments of "
                f"{self.segment_size} bytes; the format counts at most {_U32}"
            )
        if not isinstance(self.manifest_key_id, bytes) or len(self.manifest_key_id) != 32:
            raise InvalidArgument("the manifest key id must be 32 bytes (a SHA-256)")

    @property
    def segment_count(self) -> int:
        return math.ceil(self.image_size / self.segment_size)

    @property
    def payload_size(self) -> int:
        """Bytes of the whole payload: 384 + image size + 16 per segment."""
        return PREFIX_LEN + self.image_size + TAG_LEN * self.segment_count

    def to_bytes(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            SUITE,
            HEADER_LEN,
            self.segment_size,
            self.segment_count,
            self.image_size,
            MANIFEST_LEN,
            SIGNATURE_LEN,
            self.manifest_key_id,
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> SealedHeader:
        """Parse and check a header (decoding step 1); ``InvalidArgument`` names the first broken rule."""
        raw = bytes(data)
        if len(raw) != HEADER_LEN:
            raise InvalidArgument(f"an FKSP header is {HEADER_LEN} bytes, not {len(raw)}")
        magic, version, suite, header_len, size_s, count, image_size, manifest_len, signature_len, key_id = (
            _HEADER.unpack(raw)
        )
        if magic != MAGIC:
            raise InvalidArgument(
                f"not an FKSP payload: header bytes 0..3 are {magic.hex()}, expected 464b5350"
            )
        if version != FORMAT_VERSION:
            raise InvalidArgument(f"unsupported FKSP format version {version} (header byte 4); expected 1")
        if suite != SUITE:
            raise InvalidArgument(f"unsupported FKSP suite {suite} (header byte 5); expected 1")
        if header_len != HEADER_LEN:
            raise InvalidArgument(f"header length (bytes 6..7) is {header_len}; expected {HEADER_LEN}")
        if manifest_len != MANIFEST_LEN:
            raise InvalidArgument(
                f"manifest length (bytes 24..27) is {manifest_len}; expected {MANIFEST_LEN}"
            )
        if signature_len != SIGNATURE_LEN:
            raise InvalidArgument(
                f"signature length (bytes 28..31) is {signature_len}; expected {SIGNATURE_LEN}"
            )
        if not MIN_SEGMENT_SIZE <= size_s <= MAX_SEGMENT_SIZE:
            raise InvalidArgument(
                f"segment size (bytes 8..11) is {size_s}; expected {MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}"
            )
        if image_size < 1:
            raise InvalidArgument("image size (bytes 16..23) is 0; an FKSP payload carries at least one byte")
        expected = math.ceil(image_size / size_s)
        if count != expected:
            raise InvalidArgument(
                f"segment count (bytes 12..15) is {count}, but an image of {image_size} bytes in segments "
                f"of {size_s} bytes has {expected}"
            )
        return cls(size_s, image_size, key_id)


@dataclass(frozen=True)
class Manifest:
    """The 256-byte manifest: what the payload carries and for whom.

    ``device_id`` and ``product`` are printable ASCII; ``version`` is stored UTF-8 (at most 32 bytes).
    """

    image_sha256: bytes
    image_size: int
    secure_version: int
    chip_id: int
    device_id: str
    product: str
    version: str
    release_time: int

    def __post_init__(self) -> None:
        if not isinstance(self.image_sha256, bytes) or len(self.image_sha256) != 32:
            raise InvalidArgument("the manifest's image SHA-256 must be 32 bytes")
        _check_uint("image size", self.image_size, _U64, 1)
        _check_uint("secure_version", self.secure_version, _U32)
        _check_uint("chip id", self.chip_id, _U16)
        _check_uint("release time", self.release_time, _U64)
        _ascii_field("device id", self.device_id, MAX_DEVICE_ID_LEN)
        _ascii_field("product", self.product, MAX_PRODUCT_LEN)
        if len(self.version.encode("utf-8")) > MAX_VERSION_LEN:
            raise InvalidArgument(f"version {self.version!r} is longer than {MAX_VERSION_LEN} bytes in UTF-8")

    def to_bytes(self) -> bytes:
        out = bytearray(MANIFEST_LEN)
        _MANIFEST_FIXED.pack_into(
            out, 0, self.image_sha256, self.image_size, self.secure_version, self.chip_id, 0
        )
        for (length_at, field_at, _), value in (
            (_DEVICE_ID, self.device_id.encode("ascii")),
            (_PRODUCT, self.product.encode("ascii")),
            (_VERSION, self.version.encode("utf-8")),
        ):
            out[length_at] = len(value)
            out[field_at : field_at + len(value)] = value
        _RELEASE_TIME.pack_into(out, _RELEASE_TIME_OFFSET, self.release_time)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Manifest:
        """Parse and check a manifest; ``InvalidArgument`` names the offending field and manifest offset."""
        raw = bytes(data)
        if len(raw) != MANIFEST_LEN:
            raise InvalidArgument(f"an FKSP manifest is {MANIFEST_LEN} bytes, not {len(raw)}")
        image_sha256, image_size, secure_version, chip_id, reserved = _MANIFEST_FIXED.unpack_from(raw)
        if reserved != 0:
            raise InvalidArgument(
                f"manifest bytes 46..47 are reserved and must be zero, not {raw[46:48].hex()}"
            )
        tail = raw[_RESERVED_TAIL:]
        if any(tail):
            first = _RESERVED_TAIL + next(i for i, byte in enumerate(tail) if byte)
            raise InvalidArgument(
                f"manifest bytes 218..255 are reserved and must be zero; byte {first} is not"
            )
        if image_size < 1:
            raise InvalidArgument("the manifest's image size (bytes 32..39) is 0")
        device_id = _read_field(raw, "device id", _DEVICE_ID, minimum=1)
        product = _read_field(raw, "product", _PRODUCT, minimum=1)
        version = _read_field(raw, "version", _VERSION, minimum=0)
        for name, value, (length_at, _, _) in (
            ("device id", device_id, _DEVICE_ID),
            ("product", product, _PRODUCT),
        ):
            if not _is_printable_ascii(value):
                raise InvalidArgument(f"the {name} (after manifest byte {length_at}) is not printable ASCII")
        try:
            version_text = version.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument("the version (manifest bytes 178..209) is not UTF-8") from e
        (release_time,) = _RELEASE_TIME.unpack_from(raw, _RELEASE_TIME_OFFSET)
        return cls(
            image_sha256=image_sha256,
            image_size=image_size,
            secure_version=secure_version,
            chip_id=chip_id,
            device_id=device_id.decode("ascii"),
            product=product.decode("ascii"),
            version=version_text,
            release_time=release_time,
        )


def _ascii_field(name: str, value: str, maximum: int) -> None:
    if not isinstance(value, str) or not 1 <= len(value) <= maximum or not value.isascii():
        raise InvalidArgument(f"{name} {value!r} must be 1..{maximum} printable ASCII characters")
    if not _is_printable_ascii(value.encode("ascii")):
        raise InvalidArgument(f"{name} {value!r} must be 1..{maximum} printable ASCII characters")


def _read_field(raw: bytes, name: str, layout: tuple[int, int, int], *, minimum: int) -> bytes:
    length_at, field_at, size = layout
    length = raw[length_at]
    if not minimum <= length <= size:
        raise InvalidArgument(
            f"the {name} length (manifest byte {length_at}) is {length}; expected {minimum}..{size}"
        )
    padding = raw[field_at + length : field_at + size]
    if any(padding):
        raise InvalidArgument(
            f"the {name} padding (manifest bytes {field_at + length}..{field_at + size - 1}) must be zero"
        )
    return raw[field_at : field_at + length]


def _check_consistent(header: SealedHeader, manifest: Manifest) -> None:
    if header.image_size != manifest.image_size:
        raise InvalidArgument(
            f"the header's image size ({header.image_size}) differs from the manifest's "
            f"({manifest.image_size})"
        )


def signed_bytes(header: SealedHeader, manifest: Manifest) -> bytes:
    """Header || Manifest (320 bytes): what the signature covers, as SHA-256 of these bytes."""
    _check_consistent(header, manifest)
    return header.to_bytes() + manifest.to_bytes()


def key_derivation_info(manifest: Manifest, header_and_manifest: bytes) -> bytes:
    """The HKDF ``info`` of the payload key, without the trailing block counter 0x01.

    ``header_and_manifest`` is ``signed_bytes(header, manifest)``; it must hold a valid header and exactly
    ``manifest``'s bytes, so that the key is bound to what the device will verify.
    """
    data = bytes(header_and_manifest)
    if len(data) != HEADER_LEN + MANIFEST_LEN:
        raise InvalidArgument(f"header and manifest are {HEADER_LEN + MANIFEST_LEN} bytes, not {len(data)}")
    header = SealedHeader.from_bytes(data[:HEADER_LEN])
    if data[HEADER_LEN:] != manifest.to_bytes():
        raise InvalidArgument("the manifest bytes given do not encode the manifest given")
    _check_consistent(header, manifest)
    device_id = manifest.device_id.encode("ascii")
    return b"".join(
        (
            KEY_INFO_LABEL,
            b"\x00",
            bytes([len(device_id)]),
            device_id,
            manifest.image_sha256,
            hashlib.sha256(data).digest(),
        )
    )


def hkdf_expand_one_block(prk: bytes, info: bytes) -> bytes:
    """RFC 5869 HKDF-Expand-SHA256 for L = 32: ``T(1) = HMAC-SHA256(prk, info || 0x01)``.

    Tests and the device model use this; the service computes the same HMAC inside the HSM.
    """
    if len(prk) < hashes.SHA256.digest_size:
        raise InvalidArgument(f"an HKDF-SHA256 PRK has at least 32 bytes, not {len(prk)}")
    mac = hmac.HMAC(prk, hashes.SHA256())
    mac.update(info + b"\x01")
    return mac.finalize()


def nonce(i: int, last: bool) -> bytes:
    """The 12-byte nonce of segment ``i``: seven zero bytes, ``i`` big-endian, then the last-segment flag."""
    _check_uint("segment index", i, _U32)
    return bytes(7) + i.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


class HashedImage:
    """An image's bytes, frozen, with their SHA-256 computed once.

    Hash a release's image once and share it between the payloads of every device (and every resumed
    download) instead of letting each ``SealedPayload`` hash it again. A writable buffer is copied, so the
    bytes cannot change after they were hashed.
    """

    __slots__ = ("data", "sha256")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.data = view if view.readonly else memoryview(bytes(view))
        self.sha256 = hashlib.sha256(self.data).digest()

    def __repr__(self) -> str:
        return f"HashedImage(size={len(self.data)}, sha256={self.sha256.hex()})"


class SealedPayload:
    """The bytes of one payload, produced lazily: only the segments a reader asks for are encrypted.

    Construction checks that the parts fit together (sizes, lengths) and that the image's SHA-256 is the
    manifest's: the payload key is bound to that digest, so sealing another plaintext under it would reuse
    (key, nonce) pairs. Given raw bytes, that check hashes the whole image; given a ``HashedImage``, it
    compares digests. Nothing is encrypted up front.
    """

    __slots__ = ("_aead", "_header", "_image", "_prefix")

    def __init__(
        self,
        header: SealedHeader,
        manifest: Manifest,
        signature: bytes,
        payload_key: bytes,
        image: bytes | memoryview | HashedImage,
    ) -> None:
        prefix = signed_bytes(header, manifest)
        if len(signature) != SIGNATURE_LEN:
            raise InvalidArgument(
                f"the manifest signature must be {SIGNATURE_LEN} bytes (r || s), not {len(signature)}"
            )
        if len(payload_key) != KEY_LEN:
            raise InvalidArgument(f"the payload key must be {KEY_LEN} bytes, not {len(payload_key)}")
        size = len(image.data) if isinstance(image, HashedImage) else memoryview(image).nbytes
        if size != header.image_size:
            raise InvalidArgument(f"the image is {size} bytes; the header says {header.image_size}")
        hashed = image if isinstance(image, HashedImage) else HashedImage(image)
        if hashed.sha256 != manifest.image_sha256:
            raise InvalidArgument("the image's SHA-256 differs from the manifest's image SHA-256")
        self._header = header
        self._image = hashed.data
        self._prefix = prefix + bytes(signature)
        self._aead = AESGCM(bytes(payload_key))

    def __repr__(self) -> str:
        return (
            f"SealedPayload(image_size={self._header.image_size}, segment_size={self._header.segment_size})"
        )

    @property
    def header(self) -> SealedHeader:
        return self._header

    def total_size(self) -> int:
        """Bytes of the whole payload: 384 + image size + 16 per segment."""
        return self._header.payload_size

    def iter_bytes(self, offset: int = 0, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """Yield the payload from byte ``offset`` to its end, in pieces of ``chunk`` bytes (the last shorter).

        ``OutOfRange`` unless 0 <= offset <= total_size() (at the end, nothing is yielded). Encryption
        starts at the segment holding ``offset`` and proceeds one piece at a time as pieces are consumed:
        each piece seals only the segments it overlaps.
        """
        total = self.total_size()
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= total:
            raise OutOfRange(f"offset {offset!r} lies outside the payload of {total} bytes")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InvalidArgument(f"chunk must be a positive number of bytes, not {chunk!r}")
        return self._pieces(offset, chunk)

    def _pieces(self, offset: int, chunk: int) -> Iterator[bytes]:
        """The pieces of ``iter_bytes``, each assembled in one reused buffer and copied out once.

        This is the hot loop of every download (4,096 segments per 16 MiB at the default segment size), so
        it is written for the interpreter: names bound once, no call per segment but the cipher's, and
        segments sealed with ``encrypt_into`` straight into the piece being built, without a ``bytes``
        object per segment. A segment that straddles two pieces (or starts before ``offset``) is sealed
        once into a scratch buffer and its parts are copied from there. Sealing a segment again (a resumed
        download) repeats the same plaintext under the same nonce, so the ciphertext is identical.
        """
        header = self._header
        segment_size, image_size = header.segment_size, header.image_size
        last = header.segment_count - 1
        stride = segment_size + TAG_LEN
        total = header.payload_size
        prefix, image = self._prefix, self._image
        encrypt_into, make_nonce = self._aead.encrypt_into, _NONCE.pack
        buffer = memoryview(bytearray(min(chunk, total - offset)))
        scratch = memoryview(bytearray(min(stride, image_size + TAG_LEN)))
        in_scratch = -1  # the segment whose sealed bytes the scratch buffer holds
        position = offset
        while position < total:
            size = min(chunk, total - position)
            piece = buffer if size == len(buffer) else buffer[:size]
            filled = 0
            if position < PREFIX_LEN:
                filled = min(PREFIX_LEN - position, size)
                piece[:filled] = prefix[position : position + filled]
            while filled < size:
                i, skip = divmod(position + filled - PREFIX_LEN, stride)
                start = i * segment_size
                end = start + segment_size if i != last else image_size
                length = end - start + TAG_LEN
                if skip == 0 and size - filled >= length:
                    encrypt_into(
                        make_nonce(i, i == last), image[start:end], None, piece[filled : filled + length]
                    )
                    filled += length
                    continue
                if in_scratch != i:
                    encrypt_into(make_nonce(i, i == last), image[start:end], None, scratch[:length])
                    in_scratch = i
                take = min(length - skip, size - filled)
                piece[filled : filled + take] = scratch[skip : skip + take]
                filled += take
            yield bytes(piece)
            position += size
