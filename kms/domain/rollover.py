"""FKRS v1 rollover statements: an OTA manifest key's new version, signed by the version before it.

Devices trust OTA manifest keys by key id (SHA-256 of the DER SubjectPublicKeyInfo, the FKSP header's
"manifest key id"). When an officer or the scheduler rotates a product's manifest key, devices in the field
know only the old key and would refuse every payload signed by the new one. A *rollover statement* carries
the new public key signed by the old one, so a device that trusts the old key can verify it, trust the new
key and drop the old one, without a reflash. This is the idea of root rotation in The Update Framework
(each new root metadata is signed by the previous root's keys and a client walks the versions in order).
The specification is ``docs/manifest-key-rollover.md``; the device-side verifier, written from it alone, is
``kmsctl.device.rollover``.

Statement, ``144 + p + k`` bytes (235 + p for P-256); integers little-endian as in FKSP, the signature's
r and s big-endian::

    ========  ====  =========================================================================================
    offset    size  field
    ========  ====  =========================================================================================
    0         4     magic ``FKRS`` (0x46 0x4B 0x52 0x53)
    4         1     format version, 1 (suite: ECDSA P-256 / SHA-256, keys as DER SubjectPublicKeyInfo)
    5         1     product length p, 1..63
    6         p     product: p bytes of ASCII (the service's product names: lowercase letters, digits, ``.``,
                    ``_``, ``-``), no padding
    6+p       4     from version: the signing key version's number, >= 1
    10+p      4     to version: the new key version's number, > from version
    14+p      32    from key id: SHA-256 of the signing version's DER SubjectPublicKeyInfo
    46+p      32    to key id: SHA-256 of the new version's DER SubjectPublicKeyInfo (the next field)
    78+p      2     key length k: 91 (the only length version 1 allows)
    80+p      k     new public key: DER SubjectPublicKeyInfo of a P-256 key, named curve, uncompressed point
                    (exactly the bytes whose SHA-256 is the to key id, and the encoding FKSP key ids hash)
    80+p+k    64    signature: ECDSA P-256 by the from key over SHA-256 of bytes [0, 80+p+k), r || s, each
                    32 bytes big-endian
    ========  ====  =========================================================================================

Nothing may follow the signature. A chain of statements is their concatenation, oldest first; each
statement's length follows from its own p and k, so a chain splits without a separator.

Domain separation
-----------------
The OTA manifest key signs two kinds of message, always as SHA-256 of bytes the service built itself (never
a caller's digest: ``kms.service.signing.DIGEST_PURPOSES``): FKSP payload prefixes, which begin with the
header magic ``FKSP``, and these statements, which begin with ``FKRS``. The first four signed bytes differ,
so no signature over one kind is a signature over a message of the other kind unless SHA-256 has a
collision; a payload signature can never be passed off as a rollover statement, nor the reverse. The lengths
differ as well (an FKSP prefix is 320 bytes, a statement's signed part at most 234).

What a statement does not do
----------------------------
It moves devices from a key to its successor; it does not recover from the compromise of the old key,
whose holder could sign a statement of their own. Versions are made by rotation only: when the primary
version is not enabled at rotation time (an officer disabled it), nothing signs the new version and the
chain has a *gap*; devices trusting an earlier key then need the new key installed another way (reflash).
The service stores one statement per new version (``ManifestKeyRollover``) and answers a device's "I trust
key id X" with the statements from X to the current primary (``rollover_chain``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.domain import signatures
from kms.domain.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from kms.domain.keys import PRODUCT_PATTERN, Algorithm, Key, KeyName

MAGIC = b"FKRS"
FORMAT_VERSION = 1
KEY_ID_LEN = 32
SIGNATURE_LEN = 64
P256_SPKI_LEN = 91
MAX_PRODUCT_LEN = 63
FIXED_LEN = 4 + 1 + 1 + 4 + 4 + KEY_ID_LEN + KEY_ID_LEN + 2 + SIGNATURE_LEN  # 144: all but product and key
MIN_LEN = FIXED_LEN + 1 + P256_SPKI_LEN
MAX_LEN = FIXED_LEN + MAX_PRODUCT_LEN + P256_SPKI_LEN

_HEAD = struct.Struct("<4sBB")  # magic, format version, product length
_VERSIONS = struct.Struct("<II32s32sH")  # from, to, from key id, to key id, key length
_U32 = (1 << 32) - 1
_ALGORITHM = Algorithm.ECDSA_P256_SHA256


def key_id(public_key_der: bytes) -> bytes:
    """The manifest key id of a public key: SHA-256 of its DER SubjectPublicKeyInfo (as in FKSP headers)."""
    return hashlib.sha256(public_key_der).digest()


def _check_p256_spki(der: bytes) -> None:
    """``InvalidArgument`` unless ``der`` is the canonical DER SPKI of a P-256 key (91 bytes)."""
    if len(der) != P256_SPKI_LEN:
        raise InvalidArgument(
            f"a rollover statement's key is a {P256_SPKI_LEN}-byte P-256 SubjectPublicKeyInfo, "
            f"not {len(der)} bytes"
        )
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument("a rollover statement's key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidArgument("a rollover statement's key is not an ECDSA P-256 key")
    canonical = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if canonical != der:
        raise InvalidArgument("a rollover statement's key is not canonical DER (named curve, uncompressed)")


@dataclass(frozen=True)
class RolloverBody:
    """Everything a statement signs: who (product, from version and key) introduces which key (to)."""

    product: str
    from_version: int
    to_version: int
    from_key_id: bytes
    to_key_id: bytes
    to_key_der: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not PRODUCT_PATTERN.fullmatch(self.product):
            raise InvalidArgument(f"a rollover statement names a malformed product {self.product!r}")
        for name, value, minimum in (
            ("from version", self.from_version, 1),
            ("to version", self.to_version, self.from_version + 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _U32:
                raise InvalidArgument(
                    f"a rollover statement's {name} must be {minimum}..{_U32}, not {value!r}"
                )
        if len(self.from_key_id) != KEY_ID_LEN or len(self.to_key_id) != KEY_ID_LEN:
            raise InvalidArgument(f"rollover statement key ids are {KEY_ID_LEN} bytes")
        if self.from_key_id == self.to_key_id:
            raise InvalidArgument("a rollover statement cannot introduce the key that signs it")
        _check_p256_spki(self.to_key_der)
        if key_id(self.to_key_der) != self.to_key_id:
            raise InvalidArgument("a rollover statement's to key id is not the SHA-256 of its key")

    def signed_bytes(self) -> bytes:
        """Bytes [0, 80+p+k) of the statement: what the signature covers (through its SHA-256)."""
        product = self.product.encode("ascii")
        return (
            _HEAD.pack(MAGIC, FORMAT_VERSION, len(product))
            + product
            + _VERSIONS.pack(
                self.from_version, self.to_version, self.from_key_id, self.to_key_id, len(self.to_key_der)
            )
            + self.to_key_der
        )

    def digest(self) -> bytes:
        """SHA-256 of ``signed_bytes``: the digest the from key version signs in the HSM."""
        return hashlib.sha256(self.signed_bytes()).digest()


@dataclass(frozen=True)
class RolloverStatement:
    """A signed statement. ``signature`` is r || s (64 bytes, big-endian) by the from key."""

    body: RolloverBody
    signature: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.signature) != SIGNATURE_LEN:
            raise InvalidArgument(f"a rollover statement's signature is {SIGNATURE_LEN} bytes (r || s)")

    def to_bytes(self) -> bytes:
        return self.body.signed_bytes() + self.signature

    def verify(self, from_key_der: bytes) -> bool:
        """True if ``from_key_der`` has the statement's from key id and its signature verifies under it."""
        if key_id(from_key_der) != self.body.from_key_id:
            return False
        return signatures.verify_raw(_ALGORITHM, from_key_der, self.body.digest(), self.signature)

    @classmethod
    def parse(cls, data: bytes) -> RolloverStatement:
        """The statement in ``data``, which must hold exactly one; ``InvalidArgument`` for anything else.

        Checks every rule of the layout (magic, version, lengths, product, version order, canonical P-256 key
        hashing to the to key id, nothing after the signature) but not the signature: see ``verify``.
        """
        data = bytes(data)
        if len(data) < _HEAD.size:
            raise InvalidArgument(f"a rollover statement is at least {MIN_LEN} bytes; got {len(data)}")
        magic, version, product_len = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise InvalidArgument(f"not a rollover statement: magic {magic.hex()}, not {MAGIC.hex()} (FKRS)")
        if version != FORMAT_VERSION:
            raise InvalidArgument(f"rollover statement format version {version} is unknown; expected 1")
        if not 1 <= product_len <= MAX_PRODUCT_LEN:
            raise InvalidArgument(f"a rollover statement's product length is 1..63, not {product_len}")
        fields_at = _HEAD.size + product_len
        if len(data) < fields_at + _VERSIONS.size:
            raise InvalidArgument("the rollover statement is truncated")
        from_version, to_version, from_id, to_id, key_len = _VERSIONS.unpack_from(data, fields_at)
        key_at = fields_at + _VERSIONS.size
        expected = key_at + key_len + SIGNATURE_LEN
        if len(data) < expected:
            raise InvalidArgument(f"the rollover statement is truncated: {len(data)} of {expected} bytes")
        if len(data) > expected:
            raise InvalidArgument(f"{len(data) - expected} bytes follow the rollover statement's signature")
        try:
            product = data[_HEAD.size : fields_at].decode("ascii")
        except UnicodeDecodeError:
            raise InvalidArgument("a rollover statement's product is not ASCII") from None
        key_der = data[key_at : key_at + key_len]
        body = RolloverBody(product, from_version, to_version, from_id, to_id, key_der)
        return cls(body, data[key_at + key_len :])


@dataclass(frozen=True)
class ManifestKeyRollover:
    """A stored statement: version ``to_version`` of ``key_id`` signed by version ``from_version``."""

    key_id: str
    from_version: int
    to_version: int
    statement: bytes = field(repr=False)
    created_at: datetime

    def __post_init__(self) -> None:
        if not 1 <= self.from_version < self.to_version:
            raise InvalidArgument("a rollover goes from a version to a later one")

    @property
    def from_name(self) -> str:
        return str(KeyName(self.key_id, self.from_version))

    @property
    def to_name(self) -> str:
        return str(KeyName(self.key_id, self.to_version))

    def parsed(self) -> RolloverStatement:
        return RolloverStatement.parse(self.statement)

    def stored_statement(self) -> RolloverStatement:
        """The statement as read back from the store: ``parsed``, but ``DataLoss`` if the stored bytes no
        longer parse or name other versions than their row. The service wrote them from a statement it had
        just built and checked, so a failure here is corruption of the store, not a caller's mistake."""
        try:
            statement = self.parsed()
        except InvalidArgument as error:
            raise DataLoss(
                f"the stored rollover statement introducing {self.to_name} is corrupt ({error}); restore the "
                "database from a backup"
            ) from None
        body = statement.body
        if (body.from_version, body.to_version) != (self.from_version, self.to_version):
            raise DataLoss(
                f"the stored rollover statement introducing {self.to_name} names versions "
                f"{body.from_version} -> {body.to_version}; the store is corrupt: restore it from a backup"
            )
        return statement


def statement_body(key: Key, signer_version: int, new_version: int, new_key_der: bytes) -> RolloverBody:
    """What version ``signer_version`` of ``key`` signs to introduce ``new_version`` (public key
    ``new_key_der``)."""
    signer = key.version(signer_version)
    return RolloverBody(
        key.product,
        signer.version,
        new_version,
        key_id(signer.public_key_der),
        key_id(new_key_der),
        new_key_der,
    )


def rollover_chain(
    key: Key, rollovers: Sequence[ManifestKeyRollover], trusted_key_id: bytes
) -> list[ManifestKeyRollover]:
    """The statements that move a device trusting ``trusted_key_id`` to ``key``'s primary version, oldest
    first (empty when it trusts the primary already).

    Every version but the first has at most one statement, signed by the primary of the moment it was made,
    so walking back from the primary through each statement's from version gives the one possible chain.
    ``NotFound`` if no version of ``key`` has that key id; ``FailedPrecondition`` naming the version where
    the walk stops: a version made while its predecessor was not enabled (a gap), or the key's first version
    when the trusted version is not on the primary's chain. The latter needs a primary moved back to an
    older version, which ``kms.domain.lifecycle`` refuses for manifest keys (their primary moves forward
    only); it remains for data written before that rule.
    """
    if len(trusted_key_id) != KEY_ID_LEN:
        raise InvalidArgument(
            f"a manifest key id is the {KEY_ID_LEN}-byte SHA-256 of a DER SubjectPublicKeyInfo; "
            f"got {len(trusted_key_id)} bytes"
        )
    trusted = next(
        (v for v in key.versions if v.public_key_der and key_id(v.public_key_der) == trusted_key_id), None
    )
    if trusted is None:
        raise NotFound(
            f"no version of product {key.product!r}'s manifest key {key.name} has key id "
            f"{trusted_key_id.hex()}"
        )
    by_target = {r.to_version: r for r in rollovers if r.key_id == key.key_id}
    first = min(v.version for v in key.versions)
    primary = key.primary_version
    chain: list[ManifestKeyRollover] = []
    current = primary
    while current != trusted.version:
        step = by_target.get(current)
        if step is not None:
            chain.append(step)
            current = step.from_version
            continue
        here = KeyName(key.key_id, current)
        if current == first or current < trusted.version:
            path = " <- ".join([str(KeyName(key.key_id, primary)), *(s.from_name for s in chain)])
            raise FailedPrecondition(
                f"{trusted.name} is not on the rollover chain of the primary version "
                f"{KeyName(key.key_id, primary)} ({path}); devices trusting it cannot move to the primary by "
                "rollover and need its key installed another way (a reflash)"
            )
        raise FailedPrecondition(
            f"the rollover chain from {trusted.name} to {KeyName(key.key_id, primary)} has a gap: no "
            f"statement introduces {here}, made while the primary version before it was not enabled; "
            f"devices trusting {trusted.name} need the key of {here} or later installed another way "
            "(a reflash)"
        )
    chain.reverse()
    return chain
