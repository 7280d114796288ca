"""A device-side decoder for Espressif's ``esp_encrypted_img`` payloads, ECIES-P256 scheme.

This is a reference model of what the stock ESP-IDF component (``espressif/esp_encrypted_img`` 2.4 to
2.7.1, ``CONFIG_PRE_ENCRYPTED_OTA_USE_ECIES``) does with a payload, written from that component's
behaviour and independently of the service's encoder (``kms.domain.esp_encrypted_img``): it imports
nothing from ``kms`` and shares no helper with it. It holds no eFuse key either: like the device, it only
calls an HMAC (``efuse_hmac``, the HMAC peripheral keyed with the ``HMAC_UP`` eFuse block).

What the device does, in order (offsets in the 512-byte header; integers little-endian):

1. bytes 0..3 as a u32 must be ``0x0788b6cf``, else ``BAD_MAGIC``;
2. key area 4..387: ``0x04 || bytes 4..67`` must be a point on P-256 (``BAD_SERVER_KEY``); bytes 68..99
   are the HKDF salt; bytes 100..387 are ignored. The device scalar is PBKDF2-HMAC-SHA256 of the eFuse key
   (salt ``0e2160..c869``, 2048 iterations, 32 bytes, big-endian) and must lie in [1, n-1]
   (``UNUSABLE_DEVICE_KEY``); the AES-256 key is HKDF-SHA256 over the big-endian x-coordinate of the
   ECDH product, with that salt and info ``_esp_enc_img_ecc``;
3. bytes 388..403: the GCM IV, all 16 bytes used as the nonce; 404..407: ``bin_size``; 408..423: the tag;
   424..511 ignored;
4. the ciphertext is decrypted as it arrives and the plaintext handed on (to flash) **before** the tag is
   known to be good;
5. at the end the byte count must equal ``bin_size`` (``TRUNCATED``; ``TRAILING_DATA`` is raised as soon
   as a byte past ``bin_size`` arrives, where the device notices only at the end), then the tag must
   match (``BAD_TAG``). A wrong device key ends here too.

``strict=True`` adds one rule the device does not have: the ignored bytes (100..387 and 424..511) must be
zero (``RESERVED_NOT_ZERO``), which is what our encoder writes.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import AEADDecryptionContext, Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HEADER_LEN = 512
EXPECTED_MAGIC = 0x0788B6CF
DEVICE_KEY_SALT = bytes.fromhex("0e2160642dae76d33448e43d7720123d9f3b1eceb88e573a4e8f7fb94ff0c869")
DEVICE_KEY_ROUNDS = 2048
KEY_INFO = b"_esp_enc_img_ecc"
CURVE_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

EfuseHmac = Callable[[bytes], bytes]


class Reason(enum.Enum):
    BAD_MAGIC = "bad_magic"
    BAD_SERVER_KEY = "bad_server_key"
    UNUSABLE_DEVICE_KEY = "unusable_device_key"
    RESERVED_NOT_ZERO = "reserved_not_zero"
    TRUNCATED = "truncated"
    TRAILING_DATA = "trailing_data"
    BAD_TAG = "bad_tag"


class ImageRejected(Exception):
    """The payload failed; ``reason`` says at which step."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def efuse_hmac_from_secret(secret: bytes) -> EfuseHmac:
    """A software stand-in for ``esp_hmac_calculate`` with ``secret`` burned as an ``HMAC_UP`` key."""
    key = bytes(secret)
    if len(key) != 32:
        raise ValueError("an eFuse key block holds 32 bytes")
    return lambda message: hmac.digest(key, message, "sha256")


def device_scalar(efuse_hmac: EfuseHmac) -> int:
    """The device's private scalar: one 32-byte PBKDF2 block, built from HMAC calls as the device does."""
    u = efuse_hmac(DEVICE_KEY_SALT + b"\x00\x00\x00\x01")
    acc = int.from_bytes(u, "big")
    for _ in range(DEVICE_KEY_ROUNDS - 1):
        u = efuse_hmac(u)
        acc ^= int.from_bytes(u, "big")
    if not 0 < acc < CURVE_ORDER:
        raise ImageRejected(Reason.UNUSABLE_DEVICE_KEY, "PBKDF2 output is 0 or not below the P-256 order")
    return acc


def device_public_key_der(efuse_hmac: EfuseHmac) -> bytes:
    """What ``esp_encrypted_img_export_public_key`` returns: the public key as DER SubjectPublicKeyInfo."""
    private = ec.derive_private_key(device_scalar(efuse_hmac), ec.SECP256R1())
    return private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Decryptor:
    """Feed the payload in pieces of any size; ``update`` returns plaintext as the device would flash it.

    Call ``finish`` after the last piece: only then is the payload known to be good.
    """

    def __init__(self, efuse_hmac: EfuseHmac, *, strict: bool = False) -> None:
        self._efuse_hmac = efuse_hmac
        self._strict = strict
        self._header = bytearray()
        self._context: AEADDecryptionContext | None = None
        self._expected = 0
        self._seen = 0

    def update(self, data: bytes | bytearray | memoryview) -> bytes:
        piece = memoryview(data).cast("B")
        if self._context is None:
            need = HEADER_LEN - len(self._header)
            self._header += piece[:need]
            piece = piece[need:]
            if len(self._header) < HEADER_LEN:
                return b""
            self._start(bytes(self._header))
        assert self._context is not None
        if self._seen + len(piece) > self._expected:
            raise ImageRejected(Reason.TRAILING_DATA, f"more than bin_size = {self._expected} bytes follow")
        self._seen += len(piece)
        return self._context.update(piece)

    def finish(self) -> None:
        if self._context is None:
            raise ImageRejected(Reason.TRUNCATED, f"the header ended after {len(self._header)} bytes")
        if self._seen != self._expected:
            raise ImageRejected(Reason.TRUNCATED, f"{self._seen} of bin_size = {self._expected} bytes came")
        try:
            self._context.finalize()
        except InvalidTag:
            raise ImageRejected(Reason.BAD_TAG, "the GCM tag does not match") from None

    def _start(self, header: bytes) -> None:
        if int.from_bytes(header[0:4], "little") != EXPECTED_MAGIC:
            raise ImageRejected(Reason.BAD_MAGIC, f"bytes 0..3 are {header[0:4].hex()}")
        if self._strict and (any(header[100:388]) or any(header[424:512])):
            raise ImageRejected(Reason.RESERVED_NOT_ZERO, "bytes 100..387 or 424..511 are not all zero")
        try:
            server = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + header[4:68])
        except ValueError:
            raise ImageRejected(Reason.BAD_SERVER_KEY, "bytes 4..67 are not a P-256 point") from None
        mine = ec.derive_private_key(device_scalar(self._efuse_hmac), ec.SECP256R1())
        shared_x = mine.exchange(ec.ECDH(), server)
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=header[68:100], info=KEY_INFO)
        key = hkdf.derive(shared_x)
        nonce, tag = header[388:404], header[408:424]
        self._expected = int.from_bytes(header[404:408], "little")
        self._context = Cipher(algorithms.AES(key), modes.GCM(nonce, tag)).decryptor()


def decrypt(payload: bytes | bytearray | memoryview, efuse_hmac: EfuseHmac, *, strict: bool = False) -> bytes:
    """Decrypt a whole payload; ``ImageRejected`` on any failure (nothing is returned then)."""
    decryptor = Decryptor(efuse_hmac, strict=strict)
    plaintext = decryptor.update(payload)
    decryptor.finish()
    return plaintext
