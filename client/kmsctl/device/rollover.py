"""FKRS v1 rollover statements, checked the way a device should (``docs/manifest-key-rollover.md``).

A device trusts OTA manifest keys by key id (SHA-256 of the DER SubjectPublicKeyInfo). When the product's
manifest key is rotated, the service makes a *rollover statement*: the new public key, signed by the key
before it. A device given the chain of statements from the key it trusts to the current one checks each in
order and, if every one passes, trusts the new key instead of the old one.

This is the specification's second implementation: like ``decoder``, it imports nothing from the service
(``kms.domain.rollover`` is the first). ``verify_chain`` checks each statement in this order and stops at the
first failure with its verdict:

1. layout: magic ``FKRS``, format version 1, product length 1..63, key length 91, the exact length the
   lengths give (a short statement or bytes after the signature are refused), versions 1 <= from < to
   (``malformed``);
2. the product is the device's own (``wrong_product``);
3. the from key id is a key the device trusts *at this step* of the chain (``untrusted_signer``);
4. the signature (r || s, big-endian) verifies under that key over SHA-256 of everything before it
   (``bad_signature``);
5. only then, once the bytes are authenticated, the new key is parsed: a P-256 DER SubjectPublicKeyInfo
   in the canonical encoding (named curve, uncompressed point), whose SHA-256 is the to key id
   (``bad_key``).

Each statement that passes replaces its from key by its to key in the working set, so a later statement
must be signed by a key trusted after the earlier ones, the chain must come in order, and a statement
replayed after the device moved on no longer finds its signer. The result is all or nothing: the caller
gets the new trusted set only if every statement passed (``DeviceModel.apply_key_rollover`` then stores it
in one operation).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsctl.device.decoder import manifest_key_id, verify_p256_signature

MAGIC = b"FKRS"
FORMAT_VERSION = 1
KEY_ID_LEN = 32
SIGNATURE_LEN = 64
P256_SPKI_LEN = 91
MAX_PRODUCT_LEN = 63

_HEAD = struct.Struct("<4sBB")
_MIDDLE = struct.Struct("<II32s32sH")


class RolloverVerdict(enum.Enum):
    OK = "ok"
    MALFORMED = "malformed"
    WRONG_PRODUCT = "wrong_product"
    UNTRUSTED_SIGNER = "untrusted_signer"
    BAD_SIGNATURE = "bad_signature"
    BAD_KEY = "bad_key"


class RolloverRejected(Exception):
    """Statement ``index`` of a chain failed check ``verdict``; ``detail`` says where."""

    def __init__(self, verdict: RolloverVerdict, detail: str, index: int = 0) -> None:
        super().__init__(f"statement {index}: {verdict.value}: {detail}")
        self.verdict = verdict
        self.detail = detail
        self.index = index


@dataclass(frozen=True)
class Statement:
    """One statement's fields as read, not yet authenticated; ``signed`` is what the signature covers."""

    product: bytes
    from_version: int
    to_version: int
    from_key_id: bytes
    to_key_id: bytes
    key_der: bytes
    signed: bytes
    signature: bytes


def _malformed(detail: str) -> RolloverRejected:
    return RolloverRejected(RolloverVerdict.MALFORMED, detail)


def statement_length(data: bytes, offset: int = 0) -> int:
    """The length of the statement starting at ``offset``, from its own length fields (``malformed`` if the
    input ends before they do)."""
    if len(data) - offset < _HEAD.size:
        raise _malformed("input ends inside a statement's first bytes")
    product_len = data[offset + 5]
    middle_at = offset + _HEAD.size + product_len
    if len(data) < middle_at + _MIDDLE.size:
        raise _malformed("input ends before a statement's key length")
    key_len: int = struct.unpack_from("<H", data, middle_at + _MIDDLE.size - 2)[0]
    return _HEAD.size + product_len + _MIDDLE.size + key_len + SIGNATURE_LEN


def split_statements(data: bytes) -> list[bytes]:
    """The statements of a chain stored as their concatenation (``kmsctl keys rollover -o FILE``)."""
    statements: list[bytes] = []
    offset = 0
    while offset < len(data):
        try:
            length = statement_length(data, offset)
        except RolloverRejected as rejected:
            raise RolloverRejected(rejected.verdict, rejected.detail, len(statements)) from None
        statements.append(bytes(data[offset : offset + length]))
        offset += length
    return statements


def parse_statement(data: bytes) -> Statement:
    """Step 1: the layout of exactly one statement; ``RolloverRejected`` (``malformed``) otherwise."""
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise _malformed(f"{len(data)} bytes is too short for a statement")
    magic, version, product_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise _malformed(f"magic is {magic.hex()}")
    if version != FORMAT_VERSION:
        raise _malformed(f"format version {version}")
    if not 1 <= product_len <= MAX_PRODUCT_LEN:
        raise _malformed(f"product length {product_len}")
    middle_at = _HEAD.size + product_len
    if len(data) < middle_at + _MIDDLE.size:
        raise _malformed("statement truncated before its key")
    from_version, to_version, from_id, to_id, key_len = _MIDDLE.unpack_from(data, middle_at)
    if key_len != P256_SPKI_LEN:
        raise _malformed(f"key length {key_len}")
    key_at = middle_at + _MIDDLE.size
    signature_at = key_at + key_len
    if len(data) < signature_at + SIGNATURE_LEN:
        raise _malformed(f"statement truncated: {len(data)} of {signature_at + SIGNATURE_LEN} bytes")
    if len(data) > signature_at + SIGNATURE_LEN:
        raise _malformed(f"{len(data) - signature_at - SIGNATURE_LEN} bytes after the signature")
    if not 1 <= from_version < to_version:
        raise _malformed(f"versions {from_version} -> {to_version}")
    return Statement(
        product=data[_HEAD.size : middle_at],
        from_version=from_version,
        to_version=to_version,
        from_key_id=from_id,
        to_key_id=to_id,
        key_der=data[key_at:signature_at],
        signed=data[:signature_at],
        signature=data[signature_at:],
    )


def statement_key(statement: Statement) -> ec.EllipticCurvePublicKey:
    """Step 5: the authenticated statement's key, if it is a canonical P-256 SPKI with the to key id."""
    try:
        key = serialization.load_der_public_key(statement.key_der)
    except (ValueError, UnsupportedAlgorithm):
        raise RolloverRejected(RolloverVerdict.BAD_KEY, "the key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise RolloverRejected(RolloverVerdict.BAD_KEY, "the key is not an ECDSA P-256 key")
    canonical = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if canonical != statement.key_der:
        raise RolloverRejected(RolloverVerdict.BAD_KEY, "the key is not in canonical DER")
    if manifest_key_id(key) != statement.to_key_id:
        raise RolloverRejected(RolloverVerdict.BAD_KEY, "the to key id is not the SHA-256 of the key")
    return key


def verify_statement(
    data: bytes, product: bytes, trusted: Mapping[bytes, ec.EllipticCurvePublicKey]
) -> tuple[Statement, ec.EllipticCurvePublicKey]:
    """Steps 1-5 for one statement against the keys trusted now: the statement and its new key."""
    statement = parse_statement(data)
    if statement.product != product:
        raise RolloverRejected(
            RolloverVerdict.WRONG_PRODUCT, f"statement is for product {statement.product!r}, not {product!r}"
        )
    signer = trusted.get(statement.from_key_id)
    if signer is None:
        raise RolloverRejected(
            RolloverVerdict.UNTRUSTED_SIGNER, f"no trusted manifest key has id {statement.from_key_id.hex()}"
        )
    digest = hashlib.sha256(statement.signed).digest()
    if not verify_p256_signature(signer, digest, statement.signature):
        raise RolloverRejected(RolloverVerdict.BAD_SIGNATURE, "the signature does not verify")
    return statement, statement_key(statement)


def verify_chain(
    statements: Sequence[bytes], product: bytes, trusted: Mapping[bytes, ec.EllipticCurvePublicKey]
) -> dict[bytes, ec.EllipticCurvePublicKey]:
    """The trusted keys after applying ``statements`` in order; ``RolloverRejected`` (with the index of the
    failing statement) if any fails, in which case nothing is to change."""
    working = dict(trusted)
    for index, data in enumerate(statements):
        try:
            statement, key = verify_statement(data, product, working)
        except RolloverRejected as rejected:
            raise RolloverRejected(rejected.verdict, rejected.detail, index) from None
        del working[statement.from_key_id]
        working[statement.to_key_id] = key
    return working
