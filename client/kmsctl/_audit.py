"""The audit log on the client: fetching exports and verifying them offline, with the audit public key only.

The verifier here is written from the format's specification (the docstring of ``kms.domain.audit`` on the
server, summarized below), not imported from the server: kmsctl does not depend on the ``kms`` package, and
an independent implementation is a check of the server's own. A test feeds both the same tampered exports.

Export (``fwkms-audit-export/v1``): JSON lines, the header
``{"format":"fwkms-audit-export/v1","type":"header"}``, then checkpoint lines, then record lines. Exact
key sets; no key twice; hashes and signatures lowercase hex.

Record hash: ``SHA-256("fwkms-audit-record/v1" 0x00 | prev_hash (32) | body)``, body = seq (8 bytes,
big-endian) then time, caller, role, operation, product, resource, key_version, outcome, request_id, each as
a 2-byte big-endian length and its UTF-8 bytes. Record 1 chains to 32 zero bytes.

Checkpoint: ECDSA P-256 (raw r||s, 64 bytes) over SHA-256 of the note
``"fwkms-audit-checkpoint/v1\\n{count}\\n{base64(head)}\\n{time}\\n"``, by the key version it names.

Verification walks the records in file order and stops at the first problem, naming the first bad record:
``edited`` (a record does not match its hash), ``deleted`` (record k is missing), ``reordered`` (record k
appears later, or an earlier one again), ``unlinked`` (record k does not chain to k-1), ``truncated`` (a
valid checkpoint covers records that are gone), ``bad-signature``, ``checkpoint-mismatch`` (a valid
checkpoint's head differs from the chain's), ``malformed``. Records after the last checkpoint can be cut
unnoticed: keep earlier exports' checkpoints and pass them again (``extra_checkpoints``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

if TYPE_CHECKING:
    import grpc

    from kmsctl._client import KmsClient

EXPORT_FORMAT = "fwkms-audit-export/v1"
AUDIT_KEY = "keys/kms-audit"
_RECORD_LABEL = b"fwkms-audit-record/v1\x00"
_NOTE_HEADER = "fwkms-audit-checkpoint/v1"
_GENESIS = bytes(32)
_MAX_SEQ = 2**63 - 1
_MAX_TEXT = 1024
_TEXTS = ("caller", "role", "operation", "product", "resource", "key_version", "outcome", "request_id")
_RECORD_KEYS = frozenset({"type", "seq", "time", "prev_hash", "hash", *_TEXTS})
_CHECKPOINT_KEYS = frozenset({"type", "count", "head_hash", "time", "key_version", "signature"})
_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_OUTCOME = re.compile(r"[A-Z][A-Z_]{0,31}")
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
_HASH = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2})+")


class MalformedExport(ValueError):
    """A line of an export cannot be read as the format defines it."""


# -- parsed lines --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRecordLine:
    """One record of an export, as its line states it (``hash`` is the stored hash, checked by ``intact``)."""

    seq: int
    time: str
    caller: str
    role: str
    operation: str
    product: str
    resource: str
    key_version: str
    outcome: str
    request_id: str
    prev_hash: bytes
    hash: bytes

    def computed_hash(self) -> bytes:
        body = [struct.pack(">Q", self.seq)]
        for text in (self.time, *(getattr(self, name) for name in _TEXTS)):
            data = text.encode("utf-8")
            body += (struct.pack(">H", len(data)), data)
        return hashlib.sha256(_RECORD_LABEL + self.prev_hash + b"".join(body)).digest()

    @property
    def intact(self) -> bool:
        return self.computed_hash() == self.hash

    def to_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {name: getattr(self, name) for name in ("seq", "time", *_TEXTS)}
        return values | {"prev_hash": self.prev_hash.hex(), "hash": self.hash.hex()}


@dataclass(frozen=True)
class CheckpointLine:
    """A signed statement that records 1..count end with ``head_hash``."""

    count: int
    head_hash: bytes
    time: str
    key_version: str
    signature: bytes

    def note(self) -> bytes:
        head = base64.b64encode(self.head_hash).decode("ascii")
        return f"{_NOTE_HEADER}\n{self.count}\n{head}\n{self.time}\n".encode("ascii")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise MalformedExport("a key appears twice")
    return value


def _object(number: int, line: str) -> dict[str, Any]:
    try:
        value = json.loads(line, object_pairs_hook=_unique)
    except (ValueError, MalformedExport) as e:
        raise MalformedExport(f"export line {number} is not a JSON object: {e}") from e
    if not isinstance(value, dict):
        raise MalformedExport(f"export line {number} is not a JSON object")
    return value


class _Line:
    def __init__(self, number: int, value: dict[str, Any], keys: frozenset[str]) -> None:
        self._number = number
        self._value = value
        if set(value) != keys:
            self.fail(f"expected the keys {sorted(keys)}, got {sorted(value)}")

    def fail(self, why: str) -> None:
        raise MalformedExport(f"export line {self._number}: {why}")

    def text(self, name: str) -> str:
        value = self._value[name]
        if not isinstance(value, str):
            self.fail(f"{name} must be a string")
        if _BAD_CHARS.search(value):
            self.fail(f"{name} contains a control or bidirectional character")
        if len(value.encode("utf-8")) > _MAX_TEXT:
            self.fail(f"{name} is longer than {_MAX_TEXT} bytes")
        return str(value)

    def number(self, name: str) -> int:
        value = self._value[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SEQ:
            self.fail(f"{name} must be an integer from 1 to {_MAX_SEQ}")
        return int(value)

    def hex(self, name: str, pattern: re.Pattern[str]) -> bytes:
        value = self._value[name]
        if not isinstance(value, str) or not pattern.fullmatch(value):
            self.fail(f"{name} must be lowercase hexadecimal")
        return bytes.fromhex(value)

    def time(self) -> str:
        value = self._value["time"]
        if not isinstance(value, str) or not _TIME.fullmatch(value):
            self.fail("time must be YYYY-MM-DDTHH:MM:SS.ffffffZ")
        try:
            datetime.fromisoformat(value[:-1])
        except ValueError:
            self.fail(f"time {value!r} is not a date")
        return str(value)


def parse_record(number: int, value: dict[str, Any]) -> AuditRecordLine:
    line = _Line(number, value, _RECORD_KEYS)
    texts = {name: line.text(name) for name in _TEXTS}
    if not texts["operation"]:
        line.fail("operation must not be empty")
    if not _OUTCOME.fullmatch(texts["outcome"]):
        line.fail("outcome must be a status code name")
    if not _REQUEST_ID.fullmatch(texts["request_id"]):
        line.fail("request_id must be 1-128 visible ASCII characters")
    return AuditRecordLine(
        seq=line.number("seq"),
        time=line.time(),
        prev_hash=line.hex("prev_hash", _HASH),
        hash=line.hex("hash", _HASH),
        **texts,
    )


def parse_checkpoint(number: int, value: dict[str, Any]) -> CheckpointLine:
    line = _Line(number, value, _CHECKPOINT_KEYS)
    return CheckpointLine(
        count=line.number("count"),
        head_hash=line.hex("head_hash", _HASH),
        time=line.time(),
        key_version=line.text("key_version"),
        signature=line.hex("signature", _HEX),
    )


class ExportReader:
    """Reads an export lazily: ``checkpoints()`` first (completely), then ``records()``."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = enumerate(lines, 1)
        self._first_record: tuple[int, dict[str, Any]] | None = None

    def _next(self) -> tuple[int, dict[str, Any]] | None:
        for number, line in self._lines:
            return number, _object(number, line)
        return None

    def checkpoints(self) -> Iterator[CheckpointLine]:
        header = self._next()
        if header is None or header[1] != {"type": "header", "format": EXPORT_FORMAT}:
            raise MalformedExport(f"the export does not start with the {EXPORT_FORMAT} header")
        while (item := self._next()) is not None:
            if item[1].get("type") == "record":
                self._first_record = item
                return
            yield parse_checkpoint(*item)

    def records(self) -> Iterator[AuditRecordLine]:
        item = self._first_record
        while item is not None:
            number, value = item
            if value.get("type") != "record":
                raise MalformedExport(f"export line {number}: only records may follow the first record")
            yield parse_record(number, value)
            item = self._next()


# -- signatures ----------------------------------------------------------------------------------------

SignatureCheck = Callable[[CheckpointLine], bool]


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """An ECDSA P-256 public key from PEM or DER. ``ValueError`` otherwise."""
    if data.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
    else:
        key = serialization.load_der_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the audit key must be an ECDSA P-256 public key")
    return key


def signature_check(
    by_version: Mapping[str, bytes] | None = None, any_version: Sequence[bytes] = ()
) -> SignatureCheck:
    """Checks a checkpoint with the key of its key version (``by_version``: name -> PEM/DER), or with any key
    of ``any_version`` (keys trusted whatever version a checkpoint names). ``ValueError`` for a bad key."""
    named = {name: load_public_key(data) for name, data in (by_version or {}).items()}
    anywhere = [load_public_key(data) for data in any_version]

    def check(checkpoint: CheckpointLine) -> bool:
        signature = checkpoint.signature
        if len(signature) != 64:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        candidates = [
            *([named[checkpoint.key_version]] if checkpoint.key_version in named else []),
            *anywhere,
        ]
        for key in candidates:
            try:
                key.verify(der, checkpoint.note(), ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            return True
        return False

    return check


# -- verification --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditReport:
    """The outcome of a verification: records 1..``verified`` chain from the genesis to ``head_hash``, and
    1..``signed`` are covered by a valid checkpoint. On failure ``problem`` (e.g. ``"edited"``), ``detail``,
    ``first_bad`` (the first bad record, None for a checkpoint's own fault) and ``checkpoint`` (its count)."""

    verified: int
    signed: int
    head_hash: bytes
    problem: str | None = None
    first_bad: int | None = None
    checkpoint: int | None = None
    detail: str = ""
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return self.problem is None

    def __str__(self) -> str:
        if self.ok:
            return (
                f"OK: {self.verified} records chained, the first {self.signed} covered by "
                f"{self.checkpoints} signed checkpoints"
            )
        return f"FAILED ({self.problem}): {self.detail}"


class _Verification:
    def __init__(self, check: SignatureCheck) -> None:
        self._check = check
        self.verified = 0
        self.signed = 0
        self.head = _GENESIS
        self.good_checkpoints = 0

    def fail(
        self, problem: str, detail: str, *, first_bad: int | None = None, checkpoint: int | None = None
    ) -> AuditReport:
        return AuditReport(
            self.verified,
            self.signed,
            self.head,
            problem,
            first_bad,
            checkpoint,
            detail,
            self.good_checkpoints,
        )

    def run(self, checkpoints: list[CheckpointLine], records: Iterator[AuditRecordLine]) -> AuditReport:
        index = 0
        while True:
            try:
                record = next(records, None)
            except MalformedExport as e:
                return self.fail("malformed", str(e), first_bad=self.verified + 1)
            if record is None:
                break
            if (report := self._extend(record, records)) is not None:
                return report
            while index < len(checkpoints) and checkpoints[index].count == self.verified:
                if (report := self._signed(checkpoints[index])) is not None:
                    return report
                index += 1
        if index < len(checkpoints):  # a checkpoint over more records than there are
            checkpoint = checkpoints[index]
            if not self._check(checkpoint):
                return self._bad_signature(checkpoint)
            return self.fail(
                "truncated",
                f"checkpoint {checkpoint.count} is signed over {checkpoint.count} records but only "
                f"{self.verified} remain: records {self.verified + 1} to {checkpoint.count} were removed",
                first_bad=self.verified + 1,
                checkpoint=checkpoint.count,
            )
        return AuditReport(self.verified, self.signed, self.head, checkpoints=self.good_checkpoints)

    def _extend(self, record: AuditRecordLine, rest: Iterator[AuditRecordLine]) -> AuditReport | None:
        k = self.verified + 1
        if not record.intact:
            claims = "" if record.seq == k else f" (it claims number {record.seq})"
            return self.fail(
                "edited", f"record {k}{claims} does not match its hash: it was altered", first_bad=k
            )
        if record.seq == k:
            if record.prev_hash != self.head:
                return self.fail(
                    "unlinked",
                    f"record {k} does not chain to record {k - 1}: one of them was rewritten and its hash "
                    "recomputed",
                    first_bad=k,
                )
            self.verified, self.head = k, record.hash
            return None
        if record.seq < k:
            return self.fail(
                "reordered", f"record {record.seq} appears again where record {k} belongs", first_bad=k
            )
        try:
            later = any(other.seq == k for other in rest)
        except MalformedExport:
            later = False
        if later:
            return self.fail(
                "reordered",
                f"record {k} is out of order: record {record.seq} stands in its place",
                first_bad=k,
            )
        return self.fail(
            "deleted", f"record {k} is missing: record {record.seq} follows record {k - 1}", first_bad=k
        )

    def _signed(self, checkpoint: CheckpointLine) -> AuditReport | None:
        if not self._check(checkpoint):
            return self._bad_signature(checkpoint)
        if checkpoint.head_hash != self.head:
            return self.fail(
                "checkpoint-mismatch",
                f"checkpoint {checkpoint.count} is validly signed but the chain's head differs: records "
                f"{self.signed + 1} to {checkpoint.count} were rewritten (or it is another log's checkpoint)",
                checkpoint=checkpoint.count,
            )
        self.signed = checkpoint.count
        self.good_checkpoints += 1
        return None

    def _bad_signature(self, checkpoint: CheckpointLine) -> AuditReport:
        return self.fail(
            "bad-signature",
            f"the signature of checkpoint {checkpoint.count} (key {checkpoint.key_version!r}) is not valid",
            checkpoint=checkpoint.count,
        )


def verify_export_lines(
    lines: Iterable[str], check: SignatureCheck, extra_checkpoints: Iterable[CheckpointLine] = ()
) -> AuditReport:
    """Verify an export (an open file, or lines from ``AuditClient.export``); see the module documentation."""
    reader = ExportReader(lines)
    walk = _Verification(check)
    try:
        checkpoints = sorted([*reader.checkpoints(), *extra_checkpoints], key=lambda c: c.count)
    except MalformedExport as e:
        return walk.fail("malformed", f"a checkpoint cannot be read: {e}")
    return walk.run(checkpoints, reader.records())


def key_versions(lines: Iterable[str]) -> set[str]:
    """The key versions named by an export's checkpoints (to fetch their public keys)."""
    names: set[str] = set()
    for line in lines:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(value, dict)
            and value.get("type") == "checkpoint"
            and isinstance(value.get("key_version"), str)
        ):
            names.add(value["key_version"])
    return names


# -- the service -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditHead:
    """The server's last committed record (``count``, ``head_hash``) and last checkpoint, if any."""

    count: int
    head_hash: bytes
    last_checkpoint: CheckpointLine | None
    audit_key: str


class AuditClient:
    """The audit calls, over a ``KmsClient``'s connection (``AuditClient.of(client)``)."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        from kmsapi.v1 import audit_pb2
        from kmsctl import _wire

        self._timeout = timeout
        self._export = channel.unary_stream(
            _wire.method_path(audit_pb2.DESCRIPTOR, "AuditService", "ExportAuditLog"),
            request_serializer=audit_pb2.ExportAuditLogRequest.SerializeToString,
            response_deserializer=audit_pb2.AuditExportChunk.FromString,
        )
        self._head = channel.unary_unary(
            _wire.method_path(audit_pb2.DESCRIPTOR, "AuditService", "GetAuditHead"),
            request_serializer=audit_pb2.GetAuditHeadRequest.SerializeToString,
            response_deserializer=audit_pb2.AuditHead.FromString,
        )

    @classmethod
    def of(cls, client: KmsClient) -> AuditClient:
        # The same package: the audit calls share the client's channel and deadline.
        return cls(client._channel, client._timeout)

    def export(
        self,
        from_seq: int = 0,
        limit: int = 0,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[str]:
        """The export's lines (without line feeds), as the server streams them; ``from_seq``/``limit`` ask for
        a window (see audit.proto). ``KmsClientError`` on failure. No deadline unless ``timeout``: a complete
        export of a large log takes a while."""
        import grpc

        from kmsapi.v1 import audit_pb2
        from kmsctl import _wire

        request = audit_pb2.ExportAuditLogRequest(from_seq=from_seq, limit=limit)
        call = self._export(request, timeout=timeout, metadata=_metadata(request_id))
        try:
            for chunk in call:
                yield from chunk.lines
        except grpc.RpcError as error:
            raise _wire.translate(error) from error
        finally:
            call.cancel()

    def head(self, *, request_id: str | None = None) -> AuditHead:
        import grpc

        from kmsapi.v1 import audit_pb2
        from kmsctl import _wire

        try:
            response = self._head(
                audit_pb2.GetAuditHeadRequest(), timeout=self._timeout, metadata=_metadata(request_id)
            )
        except grpc.RpcError as error:
            raise _wire.translate(error) from error
        last = None
        if response.last_checkpoint:
            last = parse_checkpoint(1, _object(1, response.last_checkpoint))
        return AuditHead(response.count, response.head_hash, last, response.audit_key)


def _metadata(request_id: str | None) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),) if request_id else ()
