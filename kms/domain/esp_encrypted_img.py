"""Per-device payloads in Espressif's ``esp_encrypted_img`` format, ECIES-P256 scheme (component v2.4+).

A device running the stock ESP-IDF component (``espressif/esp_encrypted_img`` >= 2.4.0, built with
``CONFIG_PRE_ENCRYPTED_OTA_USE_ECIES`` and an ``HMAC_UP`` eFuse key) decrypts these payloads with no custom
code. This module is written from the component's source as read (file and line references are in
``tests/vectors/esp_encrypted_img/README.md``); it contains none of Espressif's code. Integers are
little-endian unless marked big-endian.

Payload, ``512 + image size`` bytes: a 512-byte header, then the AES-256-GCM ciphertext of the image.

======  ====  =====================================================================================
offset  size  field
======  ====  =====================================================================================
0       4     magic ``0x0788b6cf`` (bytes ``cf b6 88 07``)
4       64    ephemeral ("server") public key ``X || Y``, each 32 bytes **big-endian** (SEC1 without 0x04)
68      32    HKDF salt
100     288   zeros (rest of the 384-byte key area; the device ignores it)
388     16    GCM IV: all 16 bytes are the GCM nonce (not 12), so J0 = GHASH(IV || 0^64 || [128]_64)
404     4     image size (``bin_size``), u32
408     16    GCM tag
424     88    zeros (the device ignores them)
512     n     AES-256-GCM ciphertext of the image, no associated data
======  ====  =====================================================================================

Keys, as the device computes them:

- device private scalar ``d = PBKDF2-HMAC-SHA256(eFuse key, PBKDF2_SALT, 2048 iterations, 32 bytes)``
  read big-endian; the device does not reduce it: if ``d = 0`` or ``d >= n`` it refuses every payload
  (``device_public_key_from_secret`` then raises, and the factory must burn another key);
- AES key ``= HKDF-SHA256(IKM = x-coordinate of e * D (32 bytes, big-endian), salt = the header's HKDF
  salt, info = "_esp_enc_img_ecc" (16 bytes), L = 32)``, where ``e`` is the ephemeral private scalar and
  ``D = d * G`` the device public key.

The service never sees the eFuse key: the factory registers ``D`` (the device exports it as DER with
``esp_encrypted_img_export_public_key``; ``normalize_device_public_key`` accepts that), and the service
chooses ``e``.

Determinism, and why no (key, nonce) pair encrypts two different plaintexts: ``e``, the HKDF salt and the
IV come from ``derive_encryption_inputs``, an HMAC-SHA256 keyed with a 32-byte *seed* over a fixed label,
a purpose byte, a counter byte and the context ``D (65 bytes) || SHA-256(image)``. The service makes the
seed in the HSM (an HMAC key used for nothing else, over ``seed_message(device id, image SHA-256)``), so
the seed is secret and ``e`` is unknown to anyone without the HSM. ``EspEncryptedImage.for_device``
hashes the exact bytes it encrypts itself, so the AES key and IV are functions of
(seed, device public key, SHA-256 of those bytes): the same (device, image) gives byte-identical
payloads, which is what lets a download resume at any byte offset, and a different image (including the
same firmware signed again: ECDSA and RSA-PSS signatures are randomized) gives a different seed context,
hence a different ``e``, salt, AES key and IV. A collision would need a SHA-256 or HMAC-SHA256 collision.
Callers that pass ``EncryptionInputs`` themselves (``encrypt_for_device``) take that duty on: never
reuse inputs for a second image.

The scalar is ``(int(T0 || T1) mod (n - 1)) + 1`` from two HMAC blocks (512 bits): always in
``[1, n - 1]``, with a statistical distance from uniform below ``2^-256`` (FIPS 186-5 A.2.1's
"extra random bits" method, with 256 extra bits).

GCM counter wrap: with a 16-byte IV the counter block starts at a pseudorandom J0, and GCM increments only
its low 32 bits. If ``low32(J0) + blocks`` passes ``2^32`` the counter wraps; that is correct GCM, but it is
the corner where implementations disagree (Wycheproof ``CounterWrap``), and ESP-IDF's hardware GCM derives
its keystream through its generic CTR routine. A 16 MiB image would wrap for about 1 IV in 4096, and
because payloads are deterministic such a device would fail the same release forever. So the derived IV
is the first candidate (counter byte 0, 1, ...) for which the counter does not wrap, and ``EspEncryptedImage``
refuses an IV that would wrap. The format does not change: any compliant device decrypts either way.

What the format does NOT give:

- no authenticity: it is encryption only. Anyone who knows ``D`` (it is public) can make a payload that
  the device decrypts and accepts; a good tag shows only that someone encrypted it to this device's key.
- the device writes plaintext to flash as it decrypts and checks the tag only at the end
  (``esp_encrypted_img_decrypt_end``), so a forged or corrupted payload reaches flash first.
- nothing in the header is authenticated by itself: the reserved bytes are ignored, and the public key,
  salt and IV are covered only in that a change makes the tag fail.

This service therefore also signs every image with Secure Boot V2 (``kms.domain.sbv2``) before it is
encrypted: the bootloader verifies that signature and refuses a forged image whatever the transport layer
let through, and ESP-IDF's OTA verifies it before switching partitions when secure boot is enabled.

Streaming and resume: the tag sits in the header, before the ciphertext, so sending byte 408 requires a
pass over the whole image. ``EspEncryptedImage.iter_bytes(offset)`` works in two passes over the caller's
buffer, never copying the image: pass 1 (only if ``offset < 424``, i.e. the tag is still to be sent)
runs AES-GCM over the image into a scratch buffer of one chunk and keeps the 16-byte tag; pass 2 runs
AES-CTR from the counter block of ``offset`` (J0 + 1 + block index, computed with our own GHASH of the
IV) and yields the payload in chunks. A full download costs about two AES passes and one GHASH pass,
plus the SHA-256 pass of ``for_device`` (the largest of the three); a resume from an offset at or past 424
costs only the CTR pass over the rest (and that SHA-256 pass, if the object is made anew). Per request
the memory is the shared image buffer (32 concurrent requests for one release can share one ``bytes``)
plus about two chunks. The tag is cached on the object, so a caller that keeps it pays pass 1 once.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kms.domain.errors import InvalidArgument, OutOfRange

MAGIC = 0x0788B6CF
HEADER_SIZE = 512
KEY_AREA_OFFSET, KEY_AREA_SIZE = 4, 384
EPHEMERAL_KEY_OFFSET, EPHEMERAL_KEY_SIZE = 4, 64
HKDF_SALT_OFFSET, HKDF_SALT_SIZE = 68, 32
KEY_AREA_RESERVED_OFFSET, KEY_AREA_RESERVED_SIZE = 100, 288
IV_OFFSET, IV_SIZE = 388, 16
BIN_SIZE_OFFSET = 404
TAG_OFFSET, TAG_SIZE = 408, 16
RESERVED_OFFSET, RESERVED_SIZE = 424, 88

PBKDF2_SALT = bytes.fromhex("0e2160642dae76d33448e43d7720123d9f3b1eceb88e573a4e8f7fb94ff0c869")
PBKDF2_ITERATIONS = 2048
HKDF_INFO = b"_esp_enc_img_ecc"
DEVICE_SECRET_SIZE = 32
SEED_SIZE = 32
SCALAR_SIZE = 32
MAX_IMAGE_SIZE = (1 << 32) - 1
DEFAULT_CHUNK = 64 * 1024
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

DERIVATION_LABEL = b"firmware-kms esp_encrypted_img ECIES-P256 inputs v1"
SEED_LABEL = b"firmware-kms esp_encrypted_img seed v1"
_PURPOSE_SCALAR, _PURPOSE_SALT, _PURPOSE_IV = 1, 2, 3
_IV_CANDIDATES = 256

_MASK32 = (1 << 32) - 1
_MASK128 = (1 << 128) - 1
_GF128_R = 0xE1 << 120
_PREFIX = struct.Struct("<I64s32s288x16sI")  # magic .. bin_size (offsets 0..407)
_UNCOMPRESSED_LEN = 65


def device_public_key_from_secret(secret: bytes) -> bytes:
    """The ECIES public key of a device whose ``HMAC_UP`` eFuse key is ``secret``: 65 bytes ``04 || X || Y``.

    ``secret`` is the 32 bytes burned with ``espefuse burn_key BLOCK_KEYn <file> HMAC_UP`` (the file's
    bytes in order). For the factory station and tests; the service itself never holds ``secret``.
    ``InvalidArgument`` if the PBKDF2 output is 0 or >= n (about 1 key in 2^32): the device refuses to use
    such a key, so burn another one.
    """
    if not isinstance(secret, bytes) or len(secret) != DEVICE_SECRET_SIZE:
        raise InvalidArgument(f"an eFuse HMAC key is {DEVICE_SECRET_SIZE} bytes")
    raw = hashlib.pbkdf2_hmac("sha256", secret, PBKDF2_SALT, PBKDF2_ITERATIONS, SCALAR_SIZE)
    scalar = int.from_bytes(raw, "big")
    if not 1 <= scalar < P256_ORDER:
        raise InvalidArgument(
            "this eFuse key gives a PBKDF2 output outside [1, n-1]; the device cannot use it, burn another"
        )
    public = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
    return public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def normalize_device_public_key(data: bytes) -> bytes:
    """A device's P-256 public key as 65 bytes ``04 || X || Y``.

    Accepts SEC1 (uncompressed or compressed) or DER SubjectPublicKeyInfo, which is what
    ``esp_encrypted_img_export_public_key`` returns. ``InvalidArgument`` for anything else, another curve,
    or a point not on P-256.
    """
    raw = bytes(data)
    key: object
    try:
        if raw[:1] in (b"\x02", b"\x03", b"\x04"):
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        else:
            key = serialization.load_der_public_key(raw)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise InvalidArgument("the device public key is neither a P-256 SEC1 point nor DER SPKI") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidArgument("the device public key must be an ECDSA/ECDH key on P-256 (secp256r1)")
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _load_device_key(device_public_key: bytes) -> ec.EllipticCurvePublicKey:
    if not isinstance(device_public_key, bytes) or len(device_public_key) != _UNCOMPRESSED_LEN:
        raise InvalidArgument("the device public key must be 65 bytes, 04 || X || Y")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), device_public_key)
    except ValueError as e:
        raise InvalidArgument("the device public key is not a point on P-256") from e


def seed_message(device_id: str, image_sha256: bytes) -> bytes:
    """What the service's HSM HMAC key signs to make a payload's seed.

    ``label || 0x00 || len(device id) (1 byte) || device id (UTF-8) || image SHA-256 (32)``. The HMAC key
    must serve this purpose only.
    """
    encoded = device_id.encode("utf-8")
    if not 1 <= len(encoded) <= 255:
        raise InvalidArgument("a device id is 1..255 bytes in UTF-8")
    if not isinstance(image_sha256, bytes) or len(image_sha256) != 32:
        raise InvalidArgument("an image SHA-256 is 32 bytes")
    return SEED_LABEL + b"\x00" + bytes([len(encoded)]) + encoded + image_sha256


@dataclass(frozen=True)
class EncryptionInputs:
    """The per-payload choices: ephemeral private scalar (32 bytes big-endian, 1..n-1), HKDF salt, IV."""

    ephemeral_private_scalar: bytes = field(repr=False)
    hkdf_salt: bytes
    iv: bytes

    def __post_init__(self) -> None:
        scalar = self.ephemeral_private_scalar
        if not isinstance(scalar, bytes) or len(scalar) != SCALAR_SIZE:
            raise InvalidArgument(f"the ephemeral private scalar is {SCALAR_SIZE} bytes, big-endian")
        if not 1 <= int.from_bytes(scalar, "big") < P256_ORDER:
            raise InvalidArgument("the ephemeral private scalar must lie in [1, n-1] for P-256")
        if not isinstance(self.hkdf_salt, bytes) or len(self.hkdf_salt) != HKDF_SALT_SIZE:
            raise InvalidArgument(f"the HKDF salt is {HKDF_SALT_SIZE} bytes")
        if not isinstance(self.iv, bytes) or len(self.iv) != IV_SIZE:
            raise InvalidArgument(f"the esp_encrypted_img IV is {IV_SIZE} bytes")


def derive_encryption_inputs(
    seed: bytes, device_public_key: bytes, image_sha256: bytes, image_size: int
) -> EncryptionInputs:
    """Derive ``EncryptionInputs`` from a 32-byte secret seed, deterministically.

    Each output block is ``HMAC-SHA256(seed, DERIVATION_LABEL || 0x00 || purpose || counter || D ||
    image SHA-256)`` (purpose and counter one byte each, ``D`` the 65-byte device key):

    - scalar: purpose 1, counters 0 and 1; ``(int(T0 || T1) mod (n - 1)) + 1``, 32 bytes big-endian;
    - HKDF salt: purpose 2, counter 0;
    - IV: purpose 3, the first 16 bytes of the block with the lowest counter whose IV does not make the
      GCM counter wrap for ``image_size`` bytes (needs the AES key, so the ECDH is done here once).

    ``image_sha256`` must be the SHA-256 of the exact bytes that will be encrypted (see the module
    docstring); ``EspEncryptedImage.for_device`` guarantees it.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
        raise InvalidArgument(f"the seed is {SEED_SIZE} bytes")
    if not isinstance(image_sha256, bytes) or len(image_sha256) != 32:
        raise InvalidArgument("an image SHA-256 is 32 bytes")
    _check_image_size(image_size)
    device_key = _load_device_key(device_public_key)
    context = device_public_key + image_sha256

    def block(purpose: int, counter: int) -> bytes:
        message = DERIVATION_LABEL + b"\x00" + bytes([purpose, counter]) + context
        return hmac.digest(seed, message, "sha256")

    wide = int.from_bytes(block(_PURPOSE_SCALAR, 0) + block(_PURPOSE_SCALAR, 1), "big")
    scalar = (wide % (P256_ORDER - 1) + 1).to_bytes(SCALAR_SIZE, "big")
    salt = block(_PURPOSE_SALT, 0)
    aes_key = _aes_key(scalar, salt, device_key)
    hash_key = _ghash_key(aes_key)
    for counter in range(_IV_CANDIDATES):
        iv = block(_PURPOSE_IV, counter)[:IV_SIZE]
        if not _counter_wraps(_j0(hash_key, iv), image_size):
            return EncryptionInputs(scalar, salt, iv)
    raise InvalidArgument("no IV candidate avoids a GCM counter wrap")  # pragma: no cover - p < 2^-1000


def total_size(image_size: int) -> int:
    """Bytes of the payload for an image of ``image_size`` bytes: 512 + image size."""
    _check_image_size(image_size)
    return HEADER_SIZE + image_size


def encrypt_for_device(
    image: bytes,
    device_public_key: bytes,
    ephemeral_private_scalar: bytes,
    hkdf_salt: bytes,
    iv: bytes,
) -> bytes:
    """The whole payload (header + ciphertext) in memory, from explicit inputs.

    For vectors and small images. The caller guarantees the inputs are never used for another image;
    the service streams with ``EspEncryptedImage.for_device`` instead.
    """
    inputs = EncryptionInputs(ephemeral_private_scalar, hkdf_salt, iv)
    payload = EspEncryptedImage(image, device_public_key, inputs)
    return b"".join(payload.iter_bytes(0, chunk=1 << 20))


class EspEncryptedImage:
    """One image encrypted for one device, produced lazily and resumable at any byte offset.

    Construction does the ECDH and the HKDF and checks the inputs; it neither copies nor reads the image.
    The tag pass runs on first need and its result is kept on the object (sharing the object between
    threads is safe: a race computes the same 16 bytes twice).
    """

    __slots__ = ("_aes_key", "_counter0", "_image", "_inputs", "_prefix", "_tag")

    def __init__(self, image: bytes | memoryview, device_public_key: bytes, inputs: EncryptionInputs) -> None:
        view = memoryview(image).cast("B")
        _check_image_size(len(view))
        if not isinstance(inputs, EncryptionInputs):
            raise InvalidArgument("inputs must be EncryptionInputs")
        device_key = _load_device_key(device_public_key)
        aes_key = _aes_key(inputs.ephemeral_private_scalar, inputs.hkdf_salt, device_key)
        j0 = _j0(_ghash_key(aes_key), inputs.iv)
        if _counter_wraps(j0, len(view)):
            raise InvalidArgument(
                "this IV makes the GCM counter wrap over this image; derive the IV with "
                "derive_encryption_inputs, which avoids that"
            )
        ephemeral = ec.derive_private_key(
            int.from_bytes(inputs.ephemeral_private_scalar, "big"), ec.SECP256R1()
        )
        point = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self._image = view
        self._inputs = inputs
        self._aes_key = aes_key
        self._counter0 = (j0 + 1) & _MASK128
        self._prefix = _PREFIX.pack(MAGIC, point[1:], inputs.hkdf_salt, inputs.iv, len(view))
        self._tag: bytes | None = None

    @classmethod
    def for_device(
        cls, image: bytes | memoryview, device_public_key: bytes, seed: bytes
    ) -> EspEncryptedImage:
        """The service's entry point: hash the image, derive the inputs from ``seed``, bind them to both.

        Reads the image once for SHA-256; ``image_sha256`` exposes the digest so the caller can check it
        against the release it meant to send.
        """
        view = memoryview(image).cast("B")
        _check_image_size(len(view))
        digest = hashlib.sha256(view).digest()
        return cls(
            view, device_public_key, derive_encryption_inputs(seed, device_public_key, digest, len(view))
        )

    def __repr__(self) -> str:
        return f"EspEncryptedImage(image_size={len(self._image)})"

    @property
    def inputs(self) -> EncryptionInputs:
        return self._inputs

    @property
    def image_size(self) -> int:
        return len(self._image)

    def image_sha256(self) -> bytes:
        """SHA-256 of the image this payload encrypts (one pass over it)."""
        return hashlib.sha256(self._image).digest()

    def total_size(self) -> int:
        return HEADER_SIZE + len(self._image)

    def tag(self) -> bytes:
        """The 16-byte GCM tag (pass 1 over the image on the first call)."""
        if self._tag is None:
            self._tag = self._compute_tag()
        return self._tag

    def header(self) -> bytes:
        """The 512-byte header (needs the tag, so pass 1 on the first call)."""
        return self._prefix + self.tag() + bytes(RESERVED_SIZE)

    def iter_bytes(self, offset: int = 0, chunk: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        """Yield the payload from byte ``offset`` to its end in pieces of ``chunk`` bytes (the last shorter).

        ``OutOfRange`` unless 0 <= offset <= total_size() (at the end, nothing is yielded). The tag pass
        runs here, when this method is called, if ``offset < 424`` and the tag is not cached yet.
        """
        total = self.total_size()
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= total:
            raise OutOfRange(f"offset {offset!r} lies outside the payload of {total} bytes")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InvalidArgument(f"chunk must be a positive number of bytes, not {chunk!r}")
        header = self.header() if offset < RESERVED_OFFSET else bytes(HEADER_SIZE)
        return self._pieces(header, offset, chunk)

    def _pieces(self, header: bytes, offset: int, chunk: int) -> Iterator[bytes]:
        total = self.total_size()
        start = max(offset, HEADER_SIZE) - HEADER_SIZE  # first image byte to encrypt
        block, skip = divmod(start, 16)
        counter = ((self._counter0 + block) & _MASK128).to_bytes(16, "big")
        ctr = Cipher(algorithms.AES(self._aes_key), modes.CTR(counter)).encryptor()
        if skip:
            ctr.update(bytes(skip))  # advance the keystream to the byte offset
        position = offset
        while position < total:
            end = min(position + chunk, total)
            if position < HEADER_SIZE:
                head = header[position : min(end, HEADER_SIZE)]
                body = ctr.update(self._image[: end - HEADER_SIZE]) if end > HEADER_SIZE else b""
                yield head + body
            else:
                yield ctr.update(self._image[position - HEADER_SIZE : end - HEADER_SIZE])
            position = end

    def _compute_tag(self) -> bytes:
        gcm = Cipher(algorithms.AES(self._aes_key), modes.GCM(self._inputs.iv)).encryptor()
        step = DEFAULT_CHUNK
        scratch = bytearray(step + 15)
        for start in range(0, len(self._image), step):
            gcm.update_into(self._image[start : start + step], scratch)
        gcm.finalize()
        return gcm.tag


def _check_image_size(size: int) -> None:
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise InvalidArgument(f"an esp_encrypted_img image is 1..{MAX_IMAGE_SIZE} bytes, not {size}")


def _aes_key(scalar: bytes, salt: bytes, device_key: ec.EllipticCurvePublicKey) -> bytes:
    ephemeral = ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP256R1())
    shared_x = ephemeral.exchange(ec.ECDH(), device_key)  # x-coordinate, 32 bytes big-endian
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO).derive(shared_x)


def _ghash_key(aes_key: bytes) -> int:
    """H = AES_K(0^128), the GHASH key, as a 128-bit big-endian integer."""
    ecb = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()  # noqa: S305 - one block, GCM's H
    return int.from_bytes(ecb.update(bytes(16)) + ecb.finalize(), "big")


def _gf128_mul(x: int, y: int) -> int:
    """Multiplication in GCM's GF(2^128) (NIST SP 800-38D, Algorithm 1; bit 0 is the MSB)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if (x >> i) & 1:
            z ^= v
        v = (v >> 1) ^ _GF128_R if v & 1 else v >> 1
    return z


def _j0(hash_key: int, iv: bytes) -> int:
    """The pre-counter block for a 16-byte IV: GHASH_H(IV || 0^64 || [128]_64)."""
    y = _gf128_mul(int.from_bytes(iv, "big"), hash_key)
    return _gf128_mul(y ^ (len(iv) * 8), hash_key)


def _counter_wraps(j0: int, image_size: int) -> bool:
    """True if the low 32 bits of the counter would wrap while encrypting ``image_size`` bytes."""
    blocks = -(-image_size // 16)
    return (j0 & _MASK32) + blocks > _MASK32
