"""The audit log's pure part (``kms.domain.audit``): encoding vectors, validation, verification, exports.

The record body and checkpoint note are rebuilt here byte by byte from the documentation, independently of
the module, and pinned as known answers. Every kind of tampering must be named at the exact record.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import struct
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from kms.domain.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    ChainHead,
    Checkpoint,
    HsmCheckpointSigner,
    MalformedAuditData,
    Problem,
    checkpoint_json,
    checkpoint_note,
    checkpoint_verifier,
    export_header,
    parse_time,
    read_export,
    record_body,
    record_hash,
    record_json,
    sign_checkpoint,
    time_text,
    verify_chain,
    verify_export,
)
from kms.domain.errors import InvalidArgument
from kms.domain.keys import Algorithm

T0 = datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)
KEY_VERSION = "keys/audit/versions/1"


class SoftwareSigner:
    """A ``CheckpointSigner`` with an in-memory P-256 key: raw r || s over SHA-256(note), like the HSM's."""

    def __init__(self, key_version: str = KEY_VERSION) -> None:
        self.key_version = key_version
        self.private_key = ec.generate_private_key(ec.SECP256R1())

    def __call__(self, note: bytes) -> bytes:
        r, s = decode_dss_signature(self.private_key.sign(note, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    @property
    def public_key_der(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


SIGNER = SoftwareSigner()
VERIFY = checkpoint_verifier({KEY_VERSION: SIGNER.public_key_der})


def event(n: int = 0, **changes: Any) -> AuditEvent:
    fields: dict[str, object] = {
        "time": T0 + timedelta(seconds=n),
        "caller": "spiffe://kms.example/build-server/ci-1",
        "role": "build-server",
        "operation": "/kmsapi.v1.SigningService/SignDigest",
        "outcome": "OK",
        "request_id": f"req-{n}",
        "product": "thermostat",
        "resource": f"digests/{n:064x}",
        "key_version": "keys/fw-sign/versions/2",
    }
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def chain(count: int) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    prev = GENESIS_HASH
    for seq in range(1, count + 1):
        records.append(AuditRecord.chained(seq, prev, event(seq)))
        prev = records[-1].hash
    return records


def checkpoint(records: list[AuditRecord], count: int, signer: SoftwareSigner = SIGNER) -> Checkpoint:
    return sign_checkpoint(ChainHead(count, records[count - 1].hash), T0 + timedelta(hours=count), signer)


# --- Encoding vectors -------------------------------------------------------------------------------------


def field(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">H", len(data)) + data


def test_record_body_and_hash_follow_the_documented_layout() -> None:
    e = AuditEvent(
        time=datetime(2024, 5, 1, 14, 0, 0, 1, tzinfo=timezone(timedelta(hours=2))),  # stored as UTC
        caller="spiffe://kms.example/build-server/ci-1",
        role="build-server",
        operation="/kmsapi.v1.SigningService/SignDigest",
        outcome="OK",
        request_id="req-1",
        product="thermostat",
        resource="",
        key_version="keys/fw-sign/versions/2",
    )
    expected_body = (
        (7).to_bytes(8, "big")
        + b"\x00\x1b2024-05-01T12:00:00.000001Z"
        + field("spiffe://kms.example/build-server/ci-1")
        + field("build-server")
        + field("/kmsapi.v1.SigningService/SignDigest")
        + field("thermostat")
        + b"\x00\x00"  # resource: empty
        + field("keys/fw-sign/versions/2")
        + field("OK")
        + field("req-1")
    )
    prev = bytes(range(32))
    assert record_body(7, e) == expected_body
    assert (
        record_hash(prev, 7, e)
        == hashlib.sha256(b"fwkms-audit-record/v1\x00" + prev + expected_body).digest()
    )
    assert record_hash(prev, 7, e).hex() == "8a78ae225def8a98cde5bb93105f2f805e00daef6bf378b5a4c46daa6933e4e9"


def test_non_ascii_text_is_hashed_as_its_exact_utf8_bytes() -> None:
    composed, decomposed = event(resource="caf\u00e9"), event(resource="cafe\u0301")  # not normalized
    assert field("caf\u00e9") in record_body(1, composed)
    assert record_hash(GENESIS_HASH, 1, composed) != record_hash(GENESIS_HASH, 1, decomposed)


def test_checkpoint_note_is_the_documented_text() -> None:
    head = bytes(range(32))
    note = checkpoint_note(1234, head, T0)
    assert note == (
        b"fwkms-audit-checkpoint/v1\n1234\n" + base64.b64encode(head) + b"\n2024-05-01T12:00:00.000001Z\n"
    )
    assert note == b"fwkms-audit-checkpoint/v1\n1234\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n" + (
        b"2024-05-01T12:00:00.000001Z\n"
    )


def test_a_checkpoint_signature_is_ecdsa_p256_over_sha256_of_the_note() -> None:
    records = chain(3)
    cp = checkpoint(records, 3)
    assert cp.note() == checkpoint_note(3, records[2].hash, cp.time) and len(cp.signature) == 64
    assert VERIFY(cp)
    assert not VERIFY(dataclasses.replace(cp, signature=cp.signature[:32] + bytes(32)))
    assert not VERIFY(dataclasses.replace(cp, signature=cp.signature + b"\x00"))
    assert not VERIFY(dataclasses.replace(cp, key_version="keys/audit/versions/2"))
    assert not VERIFY(dataclasses.replace(cp, count=2))


def test_the_hsm_signer_signs_the_sha256_of_the_note_with_p256() -> None:
    calls: list[tuple[bytes, Algorithm, bytes]] = []

    class FakeHsm:
        def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
            calls.append((hsm_id, algorithm, digest))
            return b"\x01" * 64

    signer = HsmCheckpointSigner(FakeHsm(), b"audit-key-id-123", KEY_VERSION)  # type: ignore[arg-type]
    cp = sign_checkpoint(ChainHead(5, bytes(32)), T0, signer)
    assert calls == [(b"audit-key-id-123", Algorithm.ECDSA_P256_SHA256, hashlib.sha256(cp.note()).digest())]
    assert cp.key_version == KEY_VERSION and cp.signature == b"\x01" * 64


def test_public_keys_may_be_pem_or_der_and_must_be_p256() -> None:
    pem = SIGNER.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert checkpoint_verifier({KEY_VERSION: pem})(checkpoint(chain(1), 1))
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    der = p384.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(InvalidArgument, match="not an ECDSA P-256 key"):
        checkpoint_verifier({KEY_VERSION: der})
    with pytest.raises(InvalidArgument, match="cannot be read"):
        checkpoint_verifier({KEY_VERSION: b"garbage"})


# --- Validation -------------------------------------------------------------------------------------------


def test_times_are_fixed_width_utc_and_parsed_strictly() -> None:
    assert time_text(datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)) == "0999-01-02T03:04:05.000000Z"
    assert parse_time("2024-05-01T12:00:00.000001Z") == T0
    for text in ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00.000001+00:00", "2024-13-01T12:00:00.000000Z"):
        with pytest.raises(InvalidArgument):
            parse_time(text)
    with pytest.raises(InvalidArgument, match="time zone"):
        event(time=datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"caller": "spiffe://x/y\nforged line"}, "control"),
        ({"resource": "\x1b[31mred"}, "control"),
        ({"product": "a\u202eb"}, "bidirectional"),
        ({"role": "\u2028"}, "control"),
        ({"caller": "\ud800"}, "control"),  # a lone surrogate has no UTF-8 encoding
        ({"key_version": "k" * 1025}, "longer than 1024"),
        ({"resource": "\u00e9" * 513}, "longer than 1024"),  # 1,026 UTF-8 bytes
        ({"operation": ""}, "operation must not be empty"),
        ({"outcome": "permission denied"}, "status code name"),
        ({"outcome": "OK: key 0xdeadbeef"}, "status code name"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": "has space"}, "request_id"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"caller": b"bytes"}, "must be a string"),
    ],
)
def test_events_hold_short_identifiers_only(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        event(**changes)


def test_unauthenticated_calls_have_empty_caller_and_role() -> None:
    e = event(caller="", role="", outcome="UNAUTHENTICATED", product="", resource="", key_version="")
    assert AuditRecord.chained(1, GENESIS_HASH, e).intact


@pytest.mark.parametrize(
    ("seq", "prev", "digest"),
    [(0, GENESIS_HASH, bytes(32)), (2**63, GENESIS_HASH, bytes(32)), (True, GENESIS_HASH, bytes(32)),
     (1, bytes(31), bytes(32)), (1, GENESIS_HASH, b"")],
)  # fmt: skip
def test_records_validate_numbers_and_hashes(seq: int, prev: bytes, digest: bytes) -> None:
    with pytest.raises(InvalidArgument):
        AuditRecord(seq, prev, event(), digest)


def test_checkpoints_validate_their_fields() -> None:
    with pytest.raises(InvalidArgument, match="count"):
        Checkpoint(0, bytes(32), T0, KEY_VERSION, b"s")
    with pytest.raises(InvalidArgument, match="signature"):
        Checkpoint(1, bytes(32), T0, KEY_VERSION, b"")
    with pytest.raises(InvalidArgument, match="head_hash"):
        Checkpoint(1, bytes(33), T0, KEY_VERSION, b"s")


# --- Verification -----------------------------------------------------------------------------------------


def test_an_intact_log_verifies() -> None:
    records = chain(25)
    report = verify_chain(records, [checkpoint(records, 10), checkpoint(records, 20)], VERIFY)
    assert report.ok and str(report).startswith("OK")
    assert (report.verified, report.signed, report.head_hash) == (25, 20, records[-1].hash)
    assert verify_chain([], [], VERIFY).ok


def edited(records: list[AuditRecord], k: int, **changes: Any) -> list[AuditRecord]:
    """Record k with a field changed in place; its stored hash left as it was."""
    changed = dataclasses.replace(records[k - 1], event=dataclasses.replace(records[k - 1].event, **changes))
    return [*records[: k - 1], changed, *records[k:]]


def swapped(records: list[AuditRecord], k: int, j: int) -> list[AuditRecord]:
    moved = list(records)
    moved[k - 1], moved[j - 1] = moved[j - 1], moved[k - 1]
    return moved


def rewritten(records: list[AuditRecord], k: int, **changes: Any) -> list[AuditRecord]:
    """Record k changed and the chain recomputed from there on: what someone who knows the format does."""
    out = records[: k - 1]
    prev = out[-1].hash if out else GENESIS_HASH
    for record in records[k - 1 :]:
        e = dataclasses.replace(record.event, **changes) if record.seq == k else record.event
        out.append(AuditRecord.chained(record.seq, prev, e))
        prev = out[-1].hash
    return out


@pytest.mark.parametrize("k", [1, 7, 25])
def test_an_edited_field_is_named_at_its_record(k: int) -> None:
    records = chain(25)
    for changes in ({"caller": "spiffe://kms.example/auditor/x"}, {"outcome": "PERMISSION_DENIED"},
                    {"time": T0 + timedelta(days=1)}):  # fmt: skip
        report = verify_chain(edited(records, k, **changes), [checkpoint(records, 20)], VERIFY)
        assert (report.problem, report.first_bad, report.verified) == (Problem.EDITED, k, k - 1)
    renumbered = dataclasses.replace(records[k - 1], seq=99)
    report = verify_chain([*records[: k - 1], renumbered, *records[k:]], [], VERIFY)
    assert (report.problem, report.first_bad) == (Problem.EDITED, k) and "claims number 99" in report.detail
    for name in ("prev_hash", "hash"):
        altered: dict[str, Any] = {name: b"\x01" * 32}
        broken = dataclasses.replace(records[k - 1], **altered)
        report = verify_chain([*records[: k - 1], broken, *records[k:]], [], VERIFY)
        assert (report.problem, report.first_bad) == (Problem.EDITED, k)


@pytest.mark.parametrize("k", [1, 7, 24])
def test_a_deleted_record_is_named(k: int) -> None:
    records = chain(25)
    report = verify_chain(records[: k - 1] + records[k:], [checkpoint(records, 25)], VERIFY)
    assert (report.problem, report.first_bad, report.verified) == (Problem.DELETED, k, k - 1)


@pytest.mark.parametrize(("k", "j"), [(1, 2), (7, 8), (3, 20), (24, 25)])
def test_reordered_records_are_named_at_the_first_displaced_one(k: int, j: int) -> None:
    records = chain(25)
    report = verify_chain(swapped(records, k, j), [checkpoint(records, 25)], VERIFY)
    assert (report.problem, report.first_bad, report.verified) == (Problem.REORDERED, k, k - 1)


def test_a_repeated_record_is_out_of_order() -> None:
    records = chain(10)
    report = verify_chain([*records[:5], records[2], *records[5:]], [], VERIFY)
    assert (report.problem, report.first_bad) == (Problem.REORDERED, 6)


def test_a_rewritten_record_with_a_recomputed_hash_breaks_the_next_link() -> None:
    records = chain(10)
    forged = AuditRecord.chained(4, records[2].hash, event(4, outcome="NOT_FOUND"))
    report = verify_chain([*records[:3], forged, *records[4:]], [], VERIFY)
    assert (report.problem, report.first_bad, report.verified) == (Problem.UNLINKED, 5, 4)


def test_a_consistent_rewrite_is_caught_by_the_next_checkpoint() -> None:
    records = chain(30)
    checkpoints = [checkpoint(records, 10), checkpoint(records, 20), checkpoint(records, 30)]
    report = verify_chain(rewritten(records, 14, outcome="NOT_FOUND"), checkpoints, VERIFY)
    assert report.problem is Problem.CHECKPOINT_MISMATCH
    assert (report.checkpoint, report.signed, report.verified, report.first_bad) == (20, 10, 20, None)
    assert "records 11 to 20" in report.detail


def test_truncation_below_a_signed_count_names_the_first_missing_record() -> None:
    records = chain(30)
    checkpoints = [checkpoint(records, 10), checkpoint(records, 20)]
    report = verify_chain(records[:15], checkpoints, VERIFY)
    assert (report.problem, report.first_bad, report.checkpoint) == (Problem.TRUNCATED, 16, 20)
    assert (report.verified, report.signed) == (15, 10)


def test_the_unsigned_tail_can_be_cut_unnoticed_unless_an_older_checkpoint_is_kept() -> None:
    """The documented limit: records after the last checkpoint are protected by the chain only."""
    records = chain(30)
    report = verify_chain(records[:22], [checkpoint(records, 20)], VERIFY)
    assert report.ok and (report.verified, report.signed) == (22, 20)
    kept_by_the_auditor = checkpoint(records, 30)
    report = verify_chain(records[:20], [kept_by_the_auditor], VERIFY)
    assert (report.problem, report.first_bad) == (Problem.TRUNCATED, 21)


def test_forged_checkpoints_are_named() -> None:
    records = chain(30)
    good = checkpoint(records, 20)
    forgeries = {
        "altered signature": dataclasses.replace(good, signature=bytes(64)),
        "altered head": dataclasses.replace(good, head_hash=records[18].hash),
        "altered count": dataclasses.replace(good, count=19),
        "altered time": dataclasses.replace(good, time=good.time + timedelta(seconds=1)),
        "other key": checkpoint(records, 20, SoftwareSigner()),
        "unknown key version": checkpoint(records, 20, SoftwareSigner("keys/other/versions/1")),
    }
    for name, forged in forgeries.items():
        report = verify_chain(records, [checkpoint(records, 10), forged], VERIFY)
        assert (report.problem, report.checkpoint, report.first_bad) == (
            Problem.BAD_SIGNATURE,
            forged.count,
            None,
        ), name
        assert report.signed == 10


def test_a_forged_checkpoint_beyond_the_end_is_a_bad_signature_not_a_truncation() -> None:
    records = chain(10)
    forged = Checkpoint(50, bytes(32), T0, KEY_VERSION, bytes(64))
    report = verify_chain(records, [forged], VERIFY)
    assert (report.problem, report.checkpoint) == (Problem.BAD_SIGNATURE, 50)


def test_the_first_problem_in_log_order_is_reported() -> None:
    records = chain(30)
    forged = dataclasses.replace(checkpoint(records, 5), signature=bytes(64))
    report = verify_chain(edited(records, 12, outcome="INTERNAL"), [forged], VERIFY)
    assert (report.problem, report.checkpoint) == (Problem.BAD_SIGNATURE, 5)
    report = verify_chain(edited(records, 3, outcome="INTERNAL"), [forged], VERIFY)
    assert (report.problem, report.first_bad) == (Problem.EDITED, 3)
    assert str(report) == "FAILED (edited): record 3 does not match its hash: it was altered"


def test_unreadable_records_are_reported_where_they_stand() -> None:
    records = chain(10)

    def stream() -> Iterator[AuditRecord]:
        yield from records[:6]
        raise MalformedAuditData("row 7 is garbage")

    report = verify_chain(stream(), [], VERIFY)
    assert (report.problem, report.first_bad, report.verified) == (Problem.MALFORMED, 7, 6)


KINDS = ["edit", "delete", "swap", "renumber"]


@given(
    count=st.integers(2, 40),
    data=st.data(),
    kind=st.sampled_from(KINDS),
)
def test_any_single_tampering_is_named_at_its_record(count: int, data: st.DataObject, kind: str) -> None:
    records = chain(count)
    k = data.draw(st.integers(1, count - 1))
    if kind == "edit":
        tampered, expected = edited(records, k, request_id="replayed"), Problem.EDITED
    elif kind == "delete":
        tampered, expected = records[: k - 1] + records[k:], Problem.DELETED
    elif kind == "swap":
        j = data.draw(st.integers(k + 1, count))
        tampered, expected = swapped(records, k, j), Problem.REORDERED
    else:
        tampered = [*records[: k - 1], dataclasses.replace(records[k - 1], seq=k + 1), *records[k:]]
        expected = Problem.EDITED
    report = verify_chain(tampered, [checkpoint(records, count)], VERIFY)
    assert (report.problem, report.first_bad, report.verified) == (expected, k, k - 1)


# --- JSON-lines exports -----------------------------------------------------------------------------------


def export_lines(records: list[AuditRecord], checkpoints: list[Checkpoint]) -> list[str]:
    return [export_header()] + [checkpoint_json(c) for c in checkpoints] + [record_json(r) for r in records]


def test_an_export_round_trips_and_verifies_offline() -> None:
    records = chain(25)
    checkpoints = [checkpoint(records, 10), checkpoint(records, 20)]
    lines = export_lines(records, checkpoints)
    assert json.loads(lines[0]) == {"format": "fwkms-audit-export/v1", "type": "header"}
    assert json.loads(lines[3])["hash"] == records[0].hash.hex()
    assert all(line.isascii() for line in lines)
    parsed_checkpoints, parsed_records = read_export(lines)
    assert list(parsed_checkpoints) == checkpoints
    assert list(parsed_records) == records
    report = verify_export(io.StringIO("\n".join(lines) + "\n"), VERIFY)
    assert report.ok and (report.verified, report.signed) == (25, 20)


def test_non_ascii_fields_survive_an_export() -> None:
    records = [AuditRecord.chained(1, GENESIS_HASH, event(1, resource="gerät-\u00e9\U0001f600"))]
    lines = export_lines(records, [])
    assert "\\u00e9" in lines[1] and verify_export(lines, VERIFY).ok


def test_tampering_with_an_export_is_named() -> None:
    records = chain(25)
    lines = export_lines(records, [checkpoint(records, 10), checkpoint(records, 20)])
    first = 3  # line index of record 1
    record_line = {k: first + k - 1 for k in range(1, 26)}

    def check(tampered: list[str], problem: Problem, first_bad: int | None) -> None:
        report = verify_export(tampered, VERIFY)
        assert (report.problem, report.first_bad) == (problem, first_bad), report.detail

    edited_line = json.loads(lines[record_line[8]]) | {"outcome": "OK", "caller": "spiffe://x/y/z"}
    check(
        [*lines[: record_line[8]], json.dumps(edited_line), *lines[record_line[8] + 1 :]], Problem.EDITED, 8
    )
    check([line for i, line in enumerate(lines) if i != record_line[8]], Problem.DELETED, 8)
    moved = list(lines)
    moved[record_line[8]], moved[record_line[12]] = moved[record_line[12]], moved[record_line[8]]
    check(moved, Problem.REORDERED, 8)
    check(lines[: record_line[15]], Problem.TRUNCATED, 15)
    check([*lines[: record_line[8]], "{not json", *lines[record_line[8] + 1 :]], Problem.MALFORMED, 8)


def test_dropping_the_checkpoints_from_an_export_is_caught_with_kept_checkpoints() -> None:
    records = chain(25)
    kept = [checkpoint(records, 20)]
    shortened = export_lines(records[:12], [])
    assert verify_export(shortened, VERIFY).ok
    report = verify_export(shortened, VERIFY, extra_checkpoints=kept)
    assert (report.problem, report.first_bad) == (Problem.TRUNCATED, 13)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda lines: lines[1:],  # no header
        lambda lines: ['{"format":"fwkms-audit-export/v2","type":"header"}', *lines[1:]],
        lambda lines: [*lines, lines[1]],  # a checkpoint after the records
        lambda lines: [lines[0], lines[1][:-1] + ',"count":3}', *lines[2:]],  # a duplicated key
        lambda lines: [lines[0], lines[1].replace('"count":5', '"count":true'), *lines[2:]],
        lambda lines: [
            lines[0],
            lines[1].replace('"type":"checkpoint"', '"type":"checkpoint","x":1'),
            *lines[2:],
        ],
        lambda lines: [*lines[:2], lines[2].replace('"seq":1', '"seq":"1"'), *lines[3:]],
        lambda lines: [*lines[:2], lines[2].replace('"time":"2024', '"time":"1924-'), *lines[3:]],
        lambda lines: [*lines[:2], lines[2].replace('"hash":"', '"hash":"AB'), *lines[3:]],
        lambda lines: [*lines[:2], "[]", *lines[3:]],
    ],
)
def test_malformed_exports_are_reported_not_raised(mutate: Callable[[list[str]], list[str]]) -> None:
    records = chain(5)
    lines = export_lines(records, [checkpoint(records, 5)])
    report = verify_export(mutate(lines), VERIFY)
    assert report.problem is Problem.MALFORMED, report
