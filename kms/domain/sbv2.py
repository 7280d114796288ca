"""The Secure Boot V2 signature sector: what the ESP bootloader checks before it runs an app.

Signing an app image (see ``kms.domain.esp_image``):

1. pad the image with ``0xFF`` to a multiple of 4096 bytes (``pad_image``);
2. hash the padded image: SHA-256, or SHA-384 for ECDSA P-384 (``image_digest``);
3. have each key sign that digest, and wrap each signature in a 1216-byte block (``signature_block``);
4. append one 4096-byte sector: up to 3 blocks at offsets 0, 1216 and 2432, then ``0xFF`` fill
   (``signature_sector``).

The bootloader accepts the image if one block whose key digest is burned in eFuse (and not revoked)
carries the image's digest and a valid signature. Integers are little-endian; big numbers (RSA modulus,
curve coordinates, signatures) are stored byte-reversed, i.e. little-endian, for the hardware.

RSA-3072 block (version 2):

======  ====  ==========================================================================
offset  size  field
======  ====  ==========================================================================
0       1     magic ``0xE7``
1       1     version ``0x02``
2       2     zero
4       32    SHA-256 of the padded image
36      384   modulus n, little-endian
420     4     public exponent e
424     384   R = 2^6144 mod n, little-endian (Montgomery constant)
808     4     M' = -n^-1 mod 2^32
812     384   RSA-PSS signature (SHA-256, MGF1-SHA-256, 32-byte salt), little-endian
1196    4     CRC-32 (zlib / ISO-HDLC) of bytes 0..1195
1200    16    zero
======  ====  ==========================================================================

ECDSA block (version 3), P-256 / P-384:

=============  ============  ======================================================
offset         size          field
=============  ============  ======================================================
0              1             magic ``0xE7``
1              1             version ``0x03``
2              1             digest type: 0 SHA-256 (P-256), 1 SHA-384 (P-384)
3              1             zero
4              32 / 48       digest of the padded image
36 / 52        1             curve id: 2 P-256, 3 P-384
37 / 53        64 / 96       public point X || Y, each little-endian
101 / 149      64 / 96       signature r || s, each little-endian
165 / 245      1031 / 951    zero
1196           4             CRC-32 of bytes 0..1195
1200           16            zero
=============  ============  ======================================================

The eFuse key digest (``SECURE_BOOT_DIGESTn``) is the SHA-256 of the block's public-key fields: bytes
36..811 for RSA (n, e, R, M'), 36..100 for P-256 and 52..148 for P-384 (curve id and point). Only the
CRC-32 protects the block's own integrity; the 16 trailing zero bytes and the sector's ``0xFF`` fill are
covered by nothing.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from kms.domain.errors import InvalidArgument, InvalidImage
from kms.domain.keys import Algorithm

SECTOR_SIZE = 4096
BLOCK_SIZE = 1216
MAX_BLOCKS = 3
BLOCK_MAGIC = 0xE7
VERSION_RSA = 2
VERSION_ECDSA = 3
CRC_OFFSET = 1196

_RSA_BYTES = 384
_RSA_PSS_SALT = 32
_R_EXPONENT = 2 * 3072  # R = 2^6144 mod n
_DIGEST_OFFSET = 4
_ECDSA_SHA256, _ECDSA_SHA384 = 0, 1
_CURVE_P256, _CURVE_P384 = 2, 3


@dataclass(frozen=True)
class _EcdsaLayout:
    sha_type: int
    curve_id: int
    coordinate_size: int
    curve: type[ec.EllipticCurve]
    hash: type[hashes.SHA256 | hashes.SHA384]

    @property
    def key_offset(self) -> int:
        """Offset of the curve id: right after the digest."""
        return _DIGEST_OFFSET + self.hash.digest_size

    @property
    def signature_offset(self) -> int:
        return self.key_offset + 1 + 2 * self.coordinate_size


_ECDSA = {
    Algorithm.ECDSA_P256_SHA256: _EcdsaLayout(_ECDSA_SHA256, _CURVE_P256, 32, ec.SECP256R1, hashes.SHA256),
    Algorithm.ECDSA_P384_SHA384: _EcdsaLayout(_ECDSA_SHA384, _CURVE_P384, 48, ec.SECP384R1, hashes.SHA384),
}
_RSA_KEY = slice(36, 812)
_RSA_SIGNATURE = slice(812, 812 + _RSA_BYTES)
_KeyFactory = Callable[[], rsa.RSAPublicKey | ec.EllipticCurvePublicKey]


@dataclass(frozen=True)
class ParsedBlock:
    """One well-formed signature block read back from a sector.

    ``public_key_der`` is rebuilt from the block's key fields; ``raw_signature`` is in the RAW encoding of
    ``Hsm.sign_digest`` (r||s or the RSA-PSS signature, big-endian).
    """

    index: int
    algorithm: Algorithm
    image_digest: bytes
    public_key_der: bytes = field(repr=False)
    raw_signature: bytes = field(repr=False)
    key_digest: bytes
    crc: int


def pad_image(image: bytes) -> bytes:
    """The image padded with ``0xFF`` to a multiple of 4096 bytes (unchanged if already aligned)."""
    return bytes(image) + b"\xff" * (-len(image) % SECTOR_SIZE)


def image_digest(padded: bytes, algorithm: Algorithm) -> bytes:
    """The digest a block of ``algorithm`` carries: SHA-256, or SHA-384 for P-384, of the padded image."""
    if len(padded) % SECTOR_SIZE:
        raise ValueError(f"image of {len(padded)} bytes is not padded to a multiple of {SECTOR_SIZE}")
    return hashlib.new(algorithm.hash.value, padded).digest()


def key_digest(algorithm: Algorithm, public_key_der: bytes) -> bytes:
    """The key digest to burn in eFuse; equals ``espsecure digest-sbv2-public-key`` byte for byte.

    Raises ``InvalidArgument`` if the key is not an ``algorithm`` key.
    """
    return hashlib.sha256(_key_fields(algorithm, public_key_der)).digest()


def signature_block(
    algorithm: Algorithm, public_key_der: bytes, image_digest: bytes, raw_signature: bytes
) -> bytes:
    """The 1216-byte block carrying one signature of ``image_digest``.

    ``raw_signature`` is the RAW encoding ``Hsm.sign_digest`` returns (r||s big-endian for ECDSA, the
    big-endian RSA-PSS signature). Raises ``InvalidArgument`` if the key is not an ``algorithm`` key and
    ``ValueError`` if the digest or signature has the wrong length. It does not verify the signature:
    call ``verify_block`` for that.
    """
    if len(image_digest) != algorithm.hash.size:
        raise ValueError(
            f"{algorithm.value} needs a {algorithm.hash.size}-byte digest, got {len(image_digest)}"
        )
    if len(raw_signature) != algorithm.raw_signature_size:
        raise ValueError(
            f"{algorithm.value} RAW signature must be {algorithm.raw_signature_size} bytes, "
            f"got {len(raw_signature)}"
        )
    key_fields = _key_fields(algorithm, public_key_der)
    if algorithm is Algorithm.RSA_3072_PSS_SHA256:
        body = (
            struct.pack("<BBxx", BLOCK_MAGIC, VERSION_RSA) + image_digest + key_fields + raw_signature[::-1]
        )
    else:
        half = len(raw_signature) // 2
        r, s = raw_signature[:half], raw_signature[half:]
        header = struct.pack("<BBBx", BLOCK_MAGIC, VERSION_ECDSA, _ECDSA[algorithm].sha_type)
        body = header + image_digest + key_fields + r[::-1] + s[::-1]
    body = body.ljust(CRC_OFFSET, b"\0")
    return body + struct.pack("<I", zlib.crc32(body)) + bytes(BLOCK_SIZE - CRC_OFFSET - 4)


def signature_sector(blocks: Sequence[bytes]) -> bytes:
    """The 4096-byte sector holding 1 to 3 blocks, then ``0xFF`` fill. Append it to the padded image."""
    if not 1 <= len(blocks) <= MAX_BLOCKS:
        raise ValueError(f"a signature sector holds 1 to {MAX_BLOCKS} blocks, got {len(blocks)}")
    if any(len(block) != BLOCK_SIZE for block in blocks):
        raise ValueError(f"signature blocks are {BLOCK_SIZE} bytes each")
    return b"".join(blocks).ljust(SECTOR_SIZE, b"\xff")


def parse_signature_sector(sector: bytes) -> list[ParsedBlock]:
    """The blocks of a sector, in order, up to the first slot that does not start with the block magic.

    Returns an empty list for a sector with no block (e.g. erased flash, ``0xFF``). Raises ``InvalidImage``
    for a block that starts with the magic but is malformed: unknown version, digest type or curve, bad
    CRC-32, a public key that is not a valid key, or RSA constants that do not match the modulus.
    """
    if len(sector) != SECTOR_SIZE:
        raise InvalidImage(f"a signature sector is {SECTOR_SIZE} bytes, got {len(sector)}")
    view = memoryview(sector)
    parsed = []
    for index in range(MAX_BLOCKS):
        block = view[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        if block[0] != BLOCK_MAGIC:
            break
        parsed.append(_parse_block(index, bytes(block)))
    return parsed


def verify_block(block: bytes, image_digest: bytes, public_key_der: bytes) -> bool:
    """True if ``block`` is exactly the block of this key over this digest, with a valid signature.

    A guard against HSM faults: the service checks every block it builds before returning it. The block
    must be byte for byte the canonical encoding of its own signature for ``image_digest`` and
    ``public_key_der`` (so it carries that digest, the key fields whose digest is in eFuse, zero padding and
    a correct CRC-32), and the signature must verify. Never raises for a bad block.
    """
    if len(block) != BLOCK_SIZE or block[0] != BLOCK_MAGIC:
        return False
    try:
        parsed = _parse_block(0, bytes(block))
        canonical = signature_block(parsed.algorithm, public_key_der, image_digest, parsed.raw_signature)
    except (InvalidArgument, ValueError):  # InvalidImage, a key of another algorithm, or unparsable DER
        return False
    return canonical == bytes(block) and _signature_valid(parsed)


def _key_fields(algorithm: Algorithm, public_key_der: bytes) -> bytes:
    """The block's public-key fields, from curve id / modulus up to the signature (hashed into eFuse)."""
    algorithm.check_public_key(public_key_der)
    key = serialization.load_der_public_key(public_key_der)
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        n, e = numbers.n, numbers.e
        if e >= 1 << 32:
            raise InvalidArgument("RSA public exponent does not fit the 32-bit field of a signature block")
        r = pow(2, _R_EXPONENT, n)
        m_prime = -pow(n, -1, 1 << 32) % (1 << 32)
        return _le(n, _RSA_BYTES) + struct.pack("<I", e) + _le(r, _RSA_BYTES) + struct.pack("<I", m_prime)
    assert isinstance(key, ec.EllipticCurvePublicKey)  # check_public_key guarantees it
    layout = _ECDSA[algorithm]
    point = key.public_numbers()
    size = layout.coordinate_size
    return bytes([layout.curve_id]) + _le(point.x, size) + _le(point.y, size)


def _parse_block(index: int, block: bytes) -> ParsedBlock:
    where = f"signature block {index} (sector offset {index * BLOCK_SIZE})"
    (stored_crc,) = struct.unpack_from("<I", block, CRC_OFFSET)
    computed_crc = zlib.crc32(block[:CRC_OFFSET])
    if stored_crc != computed_crc:
        raise InvalidImage(f"{where}: CRC-32 is {stored_crc:#010x}, expected {computed_crc:#010x}")
    version, sha_type = block[1], block[2]
    if version == VERSION_RSA:
        algorithm = Algorithm.RSA_3072_PSS_SHA256
        n = int.from_bytes(block[36:420], "little")
        (e,) = struct.unpack_from("<I", block, 420)
        public_key_der = _der(lambda: rsa.RSAPublicNumbers(e, n).public_key(), where)
        try:
            key_fields = _key_fields(algorithm, public_key_der)
        except InvalidArgument:
            raise InvalidImage(f"{where}: the modulus is not a 3072-bit RSA modulus") from None
        if key_fields != block[_RSA_KEY]:
            raise InvalidImage(f"{where}: the RSA constants R and M' do not match the modulus")
        raw_signature = block[_RSA_SIGNATURE][::-1]
    elif version == VERSION_ECDSA:
        algorithm, layout = _ecdsa_layout(sha_type, block, where)
        size, at = layout.coordinate_size, layout.key_offset + 1
        x = int.from_bytes(block[at : at + size], "little")
        y = int.from_bytes(block[at + size : at + 2 * size], "little")
        curve = layout.curve()
        public_key_der = _der(lambda: ec.EllipticCurvePublicNumbers(x, y, curve).public_key(), where)
        at = layout.signature_offset
        raw_signature = block[at : at + size][::-1] + block[at + size : at + 2 * size][::-1]
    else:
        raise InvalidImage(f"{where}: unknown version {version}, expected {VERSION_RSA} or {VERSION_ECDSA}")
    digest_size = algorithm.hash.size
    return ParsedBlock(
        index=index,
        algorithm=algorithm,
        image_digest=block[_DIGEST_OFFSET : _DIGEST_OFFSET + digest_size],
        public_key_der=public_key_der,
        raw_signature=raw_signature,
        key_digest=key_digest(algorithm, public_key_der),
        crc=stored_crc,
    )


def _ecdsa_layout(sha_type: int, block: bytes, where: str) -> tuple[Algorithm, _EcdsaLayout]:
    for algorithm, layout in _ECDSA.items():
        if layout.sha_type == sha_type:
            curve_id = block[layout.key_offset]
            if curve_id != layout.curve_id:
                raise InvalidImage(
                    f"{where}: curve id {curve_id} does not match digest type {sha_type} "
                    f"(expected curve id {layout.curve_id})"
                )
            return algorithm, layout
    raise InvalidImage(f"{where}: unknown ECDSA digest type {sha_type}, expected 0 (SHA-256) or 1 (SHA-384)")


def _der(make_key: _KeyFactory, where: str) -> bytes:
    try:
        key = make_key()
    except ValueError:
        raise InvalidImage(f"{where}: the public key in the block is not a valid key") from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _signature_valid(block: ParsedBlock) -> bool:
    key = serialization.load_der_public_key(block.public_key_der)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=_RSA_PSS_SALT)
            key.verify(block.raw_signature, block.image_digest, pss, utils.Prehashed(hashes.SHA256()))
        else:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            half = len(block.raw_signature) // 2
            r = int.from_bytes(block.raw_signature[:half], "big")
            s = int.from_bytes(block.raw_signature[half:], "big")
            prehashed = utils.Prehashed(_ECDSA[block.algorithm].hash())
            key.verify(utils.encode_dss_signature(r, s), block.image_digest, ec.ECDSA(prehashed))
    except (InvalidSignature, ValueError):
        return False
    return True


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")
