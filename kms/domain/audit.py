"""The tamper-evident audit log: records, their hash chain, signed checkpoints and their verification.

Every RPC the service answers becomes one ``AuditRecord``: when (``time``), who (``caller``, ``role``), what
(``operation``, ``product``, ``resource``, ``key_version``), how it ended (``outcome``) and the request id.
Records are numbered 1, 2, 3, ... (``seq``) and each carries the hash of the one before (``prev_hash``), so
the hash of the last record, the *head*, commits to the whole log. From time to time the service signs a
``Checkpoint`` (count, head hash, time) with the audit key in the HSM, as a transparency log signs its
checkpoints or CloudTrail its digest files. ``verify_chain`` recomputes the chain and checks every checkpoint;
it needs the audit public key only, so an auditor can run it offline on a JSON-lines export
(``verify_export``). This module is pure: storage is ``kms.store.audit``.

Never a secret
--------------
A record holds identifiers only, each a short string (at most 1,024 UTF-8 bytes, no control or
bidirectional-override characters, so an exported line cannot forge a second line or reorder text on a
terminal). There is no message, payload, digest or error-text field; ``outcome`` is a status code name such
as ``OK`` or ``PERMISSION_DENIED``, never an error message (messages may quote what a caller sent). Text
fields are stored as given, never normalized: the hash covers the exact code points. Fields are strings, not
enums (``role`` is ``"build-server"``, not ``Role.BUILD_SERVER``), so renaming a role later does not make old
records unreadable.

Record hash (version 1)
-----------------------
::

    hash = SHA-256( "fwkms-audit-record/v1" | 0x00 | prev_hash (32 bytes) | body )

``prev_hash`` of record 1 is 32 zero bytes (``GENESIS_HASH``). The body, byte by byte (``record_body``):

======  =====  ==========================================================================================
offset  size   field
======  =====  ==========================================================================================
0       8      seq, unsigned big-endian, 1 .. 2**63 - 1
8       2 + n  time: n (2 bytes, big-endian) then n ASCII bytes ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC; n = 27)
...     2 + n  caller: n (2 bytes, big-endian) then the n bytes of its UTF-8 encoding (n <= 1,024)
...     2 + n  role, then operation, product, resource, key_version, outcome, request_id: each the same way
======  =====  ==========================================================================================

An absent value (no product, an unauthenticated caller) is the empty string, length 0.

Why length-prefixed binary and not canonical JSON: a length before every field makes the encoding injective
with no escaping rule to get right, and it is twenty lines in any language. Canonical JSON (RFC 8785) is
readable, but its string escaping, number formatting and UTF-16 key order are easy to implement subtly
differently, and a verifier must then reproduce a serializer byte for byte. The JSON-lines export is for
people and transport only; the verifier rebuilds the body from the parsed fields. The label and its NUL
separate record hashes from any other SHA-256 use; ``prev_hash`` has a fixed length, so needs no prefix.

Checkpoint note (version 1)
---------------------------
A checkpoint signs this ASCII text (``checkpoint_note``), four lines each ending with LF (0x0A)::

    fwkms-audit-checkpoint/v1
    <count: decimal, no sign, no leading zeros; the records 1..count are covered>
    <head: hash of record ``count``, standard base64 with padding, 44 characters>
    <time the checkpoint was made: YYYY-MM-DDTHH:MM:SS.ffffffZ>

The signature is ECDSA P-256 over SHA-256(note), raw ``r || s`` (64 bytes, big-endian): what
``Hsm.sign_digest(hsm_id, ECDSA_P256_SHA256, SHA-256(note))`` returns (``HsmCheckpointSigner``). The key
version that signed is stored next to the checkpoint (not in the note: the signature already binds the key).

Verification
------------
Records are checked in the order the store returns them (the database's insertion order, an export's line
order); checkpoints in count order, each right after the record it covers. Verification stops at the first
problem and names it (``VerificationReport``): records ``1 .. verified`` form an intact chain from the
genesis, and ``first_bad`` is the number of the first record that does not. ``Problem`` says why:

- ``EDITED``: the record found where record k belongs does not match its own stored hash (a field changed);
- ``DELETED``: record k is missing, and the record numbered k+1 or later stands in its place;
- ``REORDERED``: record k is not in its place but appears later, or an earlier record appears again;
- ``UNLINKED``: record k is intact but does not chain to record k-1: one of the two was rewritten and its hash
  recomputed;
- ``TRUNCATED``: a valid checkpoint covers more records than remain; ``first_bad`` is the first missing one;
- ``BAD_SIGNATURE``: a checkpoint's signature does not verify (forged, altered, or an unknown key version);
- ``CHECKPOINT_MISMATCH``: a validly signed checkpoint's head differs from the chain's: the records after the
  previous good checkpoint were rewritten with recomputed hashes (or the checkpoint is of another log);
- ``MALFORMED``: a record or checkpoint cannot be read at all (a wrong type in a column, a broken line).

Limits, by construction: a hash chain has no key. Tampering by plain edits, deletions or moves is named at
the exact record; someone who also recomputes hashes is caught by the next signed checkpoint, which bounds
the damage to the records after the previous one but cannot name the record. Records after the last
checkpoint (at most ``checkpoint_every`` records or ``checkpoint_interval`` seconds; the store signs a final
checkpoint when it closes) can be cut from the end unnoticed, and so can the checkpoints themselves: an
auditor keeps the checkpoints seen before and passes them again (``extra_checkpoints``).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kms.domain.errors import DataLoss, InvalidArgument
from kms.domain.keys import Algorithm
from kms.domain.ports import Hsm

HASH_SIZE = 32
GENESIS_HASH = bytes(HASH_SIZE)
RECORD_LABEL = b"fwkms-audit-record/v1\x00"
NOTE_HEADER = "fwkms-audit-checkpoint/v1"
EXPORT_FORMAT = "fwkms-audit-export/v1"
MAX_TEXT_BYTES = 1024
MAX_SEQ = 2**63 - 1

_TEXT_FIELDS = ("caller", "role", "operation", "product", "resource", "key_version", "outcome", "request_id")
# C0 and C1 controls, DEL, line and paragraph separators, bidirectional overrides and isolates, surrogates.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_OUTCOME = re.compile(r"[A-Z][A-Z_]{0,31}")
_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # visible ASCII, no spaces
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
_HEX_HASH = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_T = TypeVar("_T")


class MalformedAuditData(DataLoss):
    """A stored or exported audit record or checkpoint cannot be read (verification reports ``MALFORMED``)."""


# --- Values -----------------------------------------------------------------------------------------------


def time_text(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC, always 27 characters. ``InvalidArgument`` if naive."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidArgument("audit times must carry a time zone")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(text: str) -> datetime:
    """The inverse of ``time_text``; accepts that exact form only. ``InvalidArgument`` otherwise."""
    if not _TIME.fullmatch(text):
        raise InvalidArgument(f"malformed audit time {text!r}")
    try:
        return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)
    except ValueError as e:
        raise InvalidArgument(f"malformed audit time {text!r}") from e


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"audit field {name} must be a string")
    if _FORBIDDEN.search(value):
        raise InvalidArgument(f"audit field {name} contains a control or bidirectional character")
    if len(value.encode("utf-8")) > MAX_TEXT_BYTES:
        raise InvalidArgument(f"audit field {name} is longer than {MAX_TEXT_BYTES} bytes")


def _check_hash(name: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise InvalidArgument(f"{name} must be {HASH_SIZE} bytes")


# --- Records ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """What one RPC did, as the caller of ``append`` describes it. Validated on construction.

    ``operation`` is the full method name (``/kmsapi.v1.SigningService/SignDigest``); ``outcome`` the status
    code name (``OK``, ``PERMISSION_DENIED``: capital letters and underscores); ``request_id`` 1-128 visible
    ASCII characters; ``caller`` (the identity, e.g. a SPIFFE ID) and ``role`` are empty when the caller
    could not be authenticated; ``resource`` names the object acted on (``releases/<hex>``, a device id).
    """

    time: datetime
    caller: str
    role: str
    operation: str
    outcome: str
    request_id: str
    product: str = ""
    resource: str = ""
    key_version: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.time, datetime):
            raise InvalidArgument("audit field time must be a datetime")
        time_text(self.time)  # refuses a naive time
        object.__setattr__(self, "time", self.time.astimezone(UTC))
        for name in _TEXT_FIELDS:
            _check_text(name, getattr(self, name))
        if not self.operation:
            raise InvalidArgument("audit field operation must not be empty")
        if not _OUTCOME.fullmatch(self.outcome):
            raise InvalidArgument("audit field outcome must be a status code name such as OK")
        if not _REQUEST_ID.fullmatch(self.request_id):
            raise InvalidArgument("audit field request_id must be 1-128 visible ASCII characters")


def record_body(seq: int, event: AuditEvent) -> bytes:
    """The canonical bytes of a record without its links (see the module documentation)."""
    parts = [struct.pack(">Q", seq)]
    for text in (time_text(event.time), *(getattr(event, name) for name in _TEXT_FIELDS)):
        data = text.encode("utf-8")
        parts += (struct.pack(">H", len(data)), data)
    return b"".join(parts)


def record_hash(prev_hash: bytes, seq: int, event: AuditEvent) -> bytes:
    """SHA-256(label | prev_hash | body): the hash of record ``seq`` chained after ``prev_hash``."""
    return hashlib.sha256(RECORD_LABEL + prev_hash + record_body(seq, event)).digest()


@dataclass(frozen=True)
class AuditRecord:
    """Record number ``seq`` of the log: an event, the hash of the record before, and its own stored hash.

    Records read back from storage carry the hash that was stored, which ``intact`` checks; ``chained``
    makes a new record with the right hash.
    """

    seq: int
    prev_hash: bytes
    event: AuditEvent
    hash: bytes

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or not 1 <= self.seq <= MAX_SEQ:
            raise InvalidArgument(f"an audit sequence number must be between 1 and {MAX_SEQ}")
        _check_hash("prev_hash", self.prev_hash)
        _check_hash("hash", self.hash)

    @classmethod
    def chained(cls, seq: int, prev_hash: bytes, event: AuditEvent) -> AuditRecord:
        return cls(seq, prev_hash, event, record_hash(prev_hash, seq, event))

    @property
    def intact(self) -> bool:
        """True if the stored hash is the hash of the record's fields."""
        return record_hash(self.prev_hash, self.seq, self.event) == self.hash


@dataclass(frozen=True)
class ChainHead:
    """The state of a log: ``count`` records, the last with hash ``hash`` (``GENESIS_HASH`` when empty)."""

    count: int
    hash: bytes


EMPTY_HEAD = ChainHead(0, GENESIS_HASH)


# --- Checkpoints ------------------------------------------------------------------------------------------


def checkpoint_note(count: int, head_hash: bytes, time: datetime) -> bytes:
    """The signed text of a checkpoint (see the module documentation)."""
    head = base64.b64encode(head_hash).decode("ascii")
    return f"{NOTE_HEADER}\n{count:d}\n{head}\n{time_text(time)}\n".encode("ascii")


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement that the log's first ``count`` records end with ``head_hash``."""

    count: int
    head_hash: bytes
    time: datetime
    key_version: str
    signature: bytes

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_SEQ:
            raise InvalidArgument(f"a checkpoint count must be between 1 and {MAX_SEQ}")
        _check_hash("head_hash", self.head_hash)
        time_text(self.time)
        _check_text("key_version", self.key_version)
        if not isinstance(self.signature, bytes) or not self.signature:
            raise InvalidArgument("a checkpoint needs a signature")

    def note(self) -> bytes:
        return checkpoint_note(self.count, self.head_hash, self.time)


class CheckpointSigner(Protocol):
    """Signs checkpoint notes with the audit key; ``key_version`` names that key (``keys/x/versions/n``)."""

    @property
    def key_version(self) -> str: ...

    def __call__(self, note: bytes) -> bytes:
        """The raw ECDSA P-256 signature (r || s) over SHA-256(note). Raises ``KmsError`` on failure."""
        ...


@dataclass(frozen=True)
class HsmCheckpointSigner:
    """A ``CheckpointSigner`` over the HSM port: the audit key is an ECDSA P-256 key pair in the HSM."""

    hsm: Hsm
    hsm_id: bytes
    key_version: str

    def __call__(self, note: bytes) -> bytes:
        digest = hashlib.sha256(note).digest()
        return self.hsm.sign_digest(self.hsm_id, Algorithm.ECDSA_P256_SHA256, digest)


def sign_checkpoint(head: ChainHead, time: datetime, signer: CheckpointSigner) -> Checkpoint:
    """Sign a checkpoint of ``head`` (which must hold at least one record)."""
    signature = signer(checkpoint_note(head.count, head.hash, time))
    return Checkpoint(head.count, head.hash, time, signer.key_version, signature)


SignatureCheck = Callable[[Checkpoint], bool]
"""True if a checkpoint's signature verifies under the key its ``key_version`` names."""


def checkpoint_verifier(public_keys: Mapping[str, bytes]) -> SignatureCheck:
    """A ``SignatureCheck`` for ECDSA P-256 audit keys given as ``{key version name: PEM or DER public key}``.

    A checkpoint naming a key version not in the mapping fails. ``InvalidArgument`` if a key is not P-256.
    """
    keys: dict[str, ec.EllipticCurvePublicKey] = {}
    for name, data in public_keys.items():
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                key = serialization.load_pem_public_key(data)
            else:
                key = serialization.load_der_public_key(data)
        except ValueError as e:
            raise InvalidArgument(f"the public key of {name} cannot be read") from e
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise InvalidArgument(f"the public key of {name} is not an ECDSA P-256 key")
        keys[name] = key

    def verify(checkpoint: Checkpoint) -> bool:
        key = keys.get(checkpoint.key_version)
        signature = checkpoint.signature
        if key is None or len(signature) != 64:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            key.verify(der, checkpoint.note(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    return verify


# --- Verification -----------------------------------------------------------------------------------------


class Problem(enum.Enum):
    EDITED = "edited"
    DELETED = "deleted"
    REORDERED = "reordered"
    UNLINKED = "unlinked"
    TRUNCATED = "truncated"
    BAD_SIGNATURE = "bad-signature"
    CHECKPOINT_MISMATCH = "checkpoint-mismatch"
    MALFORMED = "malformed"


@dataclass(frozen=True)
class VerificationReport:
    """The outcome of ``verify_chain``.

    ``verified``: records 1..verified form an intact chain ending in ``head_hash``; ``signed``: the highest
    count of a checkpoint that verified (records beyond it are chained but not yet signed). On failure,
    ``problem`` and ``detail`` say what, ``first_bad`` names the first bad record (None for a checkpoint's
    own fault) and ``checkpoint`` the count of the checkpoint involved, if any.
    """

    verified: int
    signed: int
    head_hash: bytes
    problem: Problem | None = None
    first_bad: int | None = None
    checkpoint: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        if self.ok:
            return (
                f"OK: {self.verified} records chained, the first {self.signed} covered by signed checkpoints"
            )
        return f"FAILED ({self.problem.value if self.problem else ''}): {self.detail}"


def verify_chain(
    records: Iterable[AuditRecord], checkpoints: Iterable[Checkpoint], verify_signature: SignatureCheck
) -> VerificationReport:
    """Check the chain and every checkpoint; report the first problem (see the module documentation).

    ``records`` are read once, in storage order, and may be a lazy iterable; ``checkpoints`` are read
    completely first. Either may raise ``MalformedAuditData`` while being read: that is reported as
    ``MALFORMED`` at the point reached.
    """
    walk = _Walk(verify_signature)
    try:
        pending = sorted(checkpoints, key=lambda c: c.count)
    except MalformedAuditData as e:
        return walk.failed(Problem.MALFORMED, f"a checkpoint cannot be read: {e}")
    return walk.run(iter(records), pending)


class _Walk:
    """The state of one verification: how far the chain is verified, and how far it is signed."""

    def __init__(self, verify_signature: SignatureCheck) -> None:
        self._verify_signature = verify_signature
        self.verified = 0
        self.head = GENESIS_HASH
        self.signed = 0

    def failed(
        self, problem: Problem, detail: str, *, first_bad: int | None = None, checkpoint: int | None = None
    ) -> VerificationReport:
        return VerificationReport(
            self.verified, self.signed, self.head, problem, first_bad, checkpoint, detail
        )

    def run(self, records: Iterator[AuditRecord], checkpoints: list[Checkpoint]) -> VerificationReport:
        next_checkpoint = 0
        while True:
            try:
                record = next(records, None)
            except MalformedAuditData as e:
                return self.failed(Problem.MALFORMED, str(e), first_bad=self.verified + 1)
            if record is None:
                break
            if (report := self._accept(record, records)) is not None:
                return report
            while next_checkpoint < len(checkpoints) and checkpoints[next_checkpoint].count == self.verified:
                if (report := self._check(checkpoints[next_checkpoint])) is not None:
                    return report
                next_checkpoint += 1
        for checkpoint in checkpoints[next_checkpoint:]:  # each covers more records than there are
            if not self._verify_signature(checkpoint):
                return self._bad_signature(checkpoint)
            return self.failed(
                Problem.TRUNCATED,
                f"checkpoint {checkpoint.count} is signed over {checkpoint.count} records but only "
                f"{self.verified} remain: records {self.verified + 1} to {checkpoint.count} were removed",
                first_bad=self.verified + 1,
                checkpoint=checkpoint.count,
            )
        return VerificationReport(self.verified, self.signed, self.head)

    def _accept(self, record: AuditRecord, rest: Iterator[AuditRecord]) -> VerificationReport | None:
        """Extend the verified chain by ``record`` or report why it cannot be."""
        expected = self.verified + 1
        if not record.intact:
            where = "" if record.seq == expected else f" (it claims number {record.seq})"
            return self.failed(
                Problem.EDITED,
                f"record {expected}{where} does not match its hash: it was altered",
                first_bad=expected,
            )
        if record.seq == expected:
            if record.prev_hash != self.head:
                return self.failed(
                    Problem.UNLINKED,
                    f"record {expected} does not chain to record {expected - 1}: one of them was rewritten "
                    "and its hash recomputed",
                    first_bad=expected,
                )
            self.verified, self.head = expected, record.hash
            return None
        if record.seq < expected:
            return self.failed(
                Problem.REORDERED,
                f"record {record.seq} appears again where record {expected} belongs",
                first_bad=expected,
            )
        if _appears_later(expected, rest):
            return self.failed(
                Problem.REORDERED,
                f"record {expected} is out of order: record {record.seq} stands in its place",
                first_bad=expected,
            )
        return self.failed(
            Problem.DELETED,
            f"record {expected} is missing: record {record.seq} follows record {expected - 1}",
            first_bad=expected,
        )

    def _check(self, checkpoint: Checkpoint) -> VerificationReport | None:
        if not self._verify_signature(checkpoint):
            return self._bad_signature(checkpoint)
        if checkpoint.head_hash != self.head:
            return self.failed(
                Problem.CHECKPOINT_MISMATCH,
                f"checkpoint {checkpoint.count} is validly signed but the chain's head differs: records "
                f"{self.signed + 1} to {checkpoint.count} were rewritten (or it is another log's checkpoint)",
                checkpoint=checkpoint.count,
            )
        self.signed = checkpoint.count
        return None

    def _bad_signature(self, checkpoint: Checkpoint) -> VerificationReport:
        return self.failed(
            Problem.BAD_SIGNATURE,
            f"the signature of checkpoint {checkpoint.count} (key {checkpoint.key_version!r}) is not valid",
            checkpoint=checkpoint.count,
        )


def _appears_later(seq: int, rest: Iterator[AuditRecord]) -> bool:
    try:
        return any(record.seq == seq for record in rest)
    except MalformedAuditData:
        return False


# --- JSON lines -------------------------------------------------------------------------------------------
#
# An export is one JSON object per line (ASCII, keys sorted, no spaces): a header, every checkpoint in count
# order, then every record in storage order. Checkpoints come first so that a verifier can stream the records
# and so that cutting the end of the file leaves the checkpoints that prove the cut. Hashes and signatures are
# lowercase hex; times as in the record body.
#
#   {"format":"fwkms-audit-export/v1","type":"header"}
#   {"count":..,"head_hash":"..","key_version":"..","signature":"..","time":"..","type":"checkpoint"}
#   {"caller":..,"hash":..,"key_version":..,"operation":..,"outcome":..,"prev_hash":..,"product":..,
#    "request_id":..,"resource":..,"role":..,"seq":..,"time":..,"type":"record"}

_CHECKPOINT_KEYS = frozenset({"type", "count", "head_hash", "time", "key_version", "signature"})
_RECORD_KEYS = frozenset({"type", "seq", "time", *_TEXT_FIELDS, "prev_hash", "hash"})


def _json_line(value: Mapping[str, object]) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def export_header() -> str:
    return _json_line({"type": "header", "format": EXPORT_FORMAT})


def checkpoint_json(checkpoint: Checkpoint) -> str:
    return _json_line(
        {
            "type": "checkpoint",
            "count": checkpoint.count,
            "head_hash": checkpoint.head_hash.hex(),
            "time": time_text(checkpoint.time),
            "key_version": checkpoint.key_version,
            "signature": checkpoint.signature.hex(),
        }
    )


def record_json(record: AuditRecord) -> str:
    event = record.event
    fields: dict[str, object] = {name: getattr(event, name) for name in _TEXT_FIELDS}
    fields |= {
        "type": "record",
        "seq": record.seq,
        "time": time_text(event.time),
        "prev_hash": record.prev_hash.hex(),
        "hash": record.hash.hex(),
    }
    return _json_line(fields)


def read_export(lines: Iterable[str]) -> tuple[Iterator[Checkpoint], Iterator[AuditRecord]]:
    """Parse an export lazily: its checkpoints, then its records (consume them in that order).

    A line that is not exactly what ``checkpoint_json``/``record_json`` write raises ``MalformedAuditData``
    naming the line, while the iterator is being consumed.
    """
    reader = _ExportReader(lines)
    return reader.checkpoints(), reader.records()


def verify_export(
    lines: Iterable[str], verify_signature: SignatureCheck, extra_checkpoints: Iterable[Checkpoint] = ()
) -> VerificationReport:
    """``verify_chain`` over an export (for example an open file), with checkpoints kept from earlier."""
    checkpoints, records = read_export(lines)

    def all_checkpoints() -> Iterator[Checkpoint]:
        yield from checkpoints
        yield from extra_checkpoints

    return verify_chain(records, all_checkpoints(), verify_signature)


class _ExportReader:
    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = enumerate(lines, 1)
        self._first_record: tuple[int, dict[str, object]] | None = None

    def _next(self) -> tuple[int, dict[str, object]] | None:
        for number, line in self._lines:
            try:
                value = json.loads(line, object_pairs_hook=_unique_keys)
            except (ValueError, MalformedAuditData) as e:
                raise MalformedAuditData(f"export line {number} is not a JSON object: {e}") from e
            if not isinstance(value, dict):
                raise MalformedAuditData(f"export line {number} is not a JSON object")
            return number, value
        return None

    def checkpoints(self) -> Iterator[Checkpoint]:
        header = self._next()
        if header is None or header[1] != {"type": "header", "format": EXPORT_FORMAT}:
            raise MalformedAuditData(f"the export does not start with the {EXPORT_FORMAT} header")
        while (item := self._next()) is not None:
            number, value = item
            if value.get("type") == "record":
                self._first_record = item
                return
            yield _parsed(number, value, _checkpoint_from_json)

    def records(self) -> Iterator[AuditRecord]:
        item = self._first_record
        while item is not None:
            number, value = item
            if value.get("type") != "record":
                raise MalformedAuditData(f"export line {number}: only records may follow the first record")
            yield _parsed(number, value, _record_from_json)
            item = self._next()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise MalformedAuditData("a key appears twice")
    return value


def _parsed(number: int, value: dict[str, object], parse: Callable[[_Fields], _T]) -> _T:
    try:
        return parse(_Fields(value))
    except InvalidArgument as e:
        raise MalformedAuditData(f"export line {number}: {e}") from e


class _Fields:
    """Typed access to one parsed line; ``InvalidArgument`` for a missing or mistyped value."""

    def __init__(self, value: dict[str, object]) -> None:
        self._value = value

    def keys(self, expected: frozenset[str]) -> None:
        if set(self._value) != expected:
            raise InvalidArgument(f"expected the keys {sorted(expected)}, got {sorted(self._value)}")

    def text(self, name: str) -> str:
        value = self._value[name]
        if not isinstance(value, str):
            raise InvalidArgument(f"{name} must be a string")
        return value

    def integer(self, name: str) -> int:
        value = self._value[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{name} must be an integer")
        return value

    def hex(self, name: str, pattern: re.Pattern[str] = _HEX) -> bytes:
        text = self.text(name)
        if not pattern.fullmatch(text):
            raise InvalidArgument(f"{name} must be lowercase hexadecimal")
        return bytes.fromhex(text)


def _checkpoint_from_json(fields: _Fields) -> Checkpoint:
    fields.keys(_CHECKPOINT_KEYS)
    return Checkpoint(
        count=fields.integer("count"),
        head_hash=fields.hex("head_hash", _HEX_HASH),
        time=parse_time(fields.text("time")),
        key_version=fields.text("key_version"),
        signature=fields.hex("signature"),
    )


def _record_from_json(fields: _Fields) -> AuditRecord:
    fields.keys(_RECORD_KEYS)
    event = AuditEvent(
        time=parse_time(fields.text("time")),
        caller=fields.text("caller"),
        role=fields.text("role"),
        operation=fields.text("operation"),
        outcome=fields.text("outcome"),
        request_id=fields.text("request_id"),
        product=fields.text("product"),
        resource=fields.text("resource"),
        key_version=fields.text("key_version"),
    )
    return AuditRecord(
        fields.integer("seq"), fields.hex("prev_hash", _HEX_HASH), event, fields.hex("hash", _HEX_HASH)
    )
