"""The client's independent verifier (kmsctl._audit) agrees with the server's (kms.domain.audit) on exports.

A real SqliteAuditLog, checkpointed with a software P-256 key, is exported; each tampering of the export is
then verified by both, which must report the same problem, the same first bad record and the same counts.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from kms.domain.audit import AuditEvent, checkpoint_verifier, verify_export
from kms.store.audit import SqliteAuditLog, write_export
from kms.store.database import Database
from kmsctl._audit import ExportReader, signature_check, verify_export_lines

KEY_VERSION = "keys/kms-audit/versions/1"
T0 = datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)


class Signer:
    key_version = KEY_VERSION

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    def __call__(self, note: bytes) -> bytes:
        r, s = decode_dss_signature(self.key.sign(note, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


SIGNER = Signer()


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """12 records, checkpoints at 4, 8 and 12."""
    path: Path = tmp_path_factory.mktemp("audit") / "audit.db"
    with Database.open(path) as db:
        log = SqliteAuditLog(db, SIGNER, checkpoint_every=1000)
        for n in range(1, 13):
            log.append(
                AuditEvent(
                    time=T0,
                    caller="spiffe://kms.dev/build-server/dev",
                    role="build-server",
                    operation="/kmsapi.v1.SigningService/SignDigest",
                    outcome="OK" if n % 3 else "PERMISSION_DENIED",
                    request_id=f"req-{n}",
                    product="thermostat",
                    resource="keys/fw",
                    key_version="keys/fw/versions/1",
                )
            )
            if n % 4 == 0:
                log.checkpoint()
        log.close()
        out = io.StringIO()
        write_export(db, out)
    return out.getvalue().splitlines()


def _record_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if '"type":"record"' in line]


def _checkpoint_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if '"type":"checkpoint"' in line]


def _replace(lines: list[str], i: int, *new: str) -> list[str]:
    return [*lines[:i], *new, *lines[i + 1 :]]


def _with(line: str, **changes: object) -> str:
    value = json.loads(line) | changes
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _rehash(value: dict[str, object]) -> dict[str, object]:
    """Recompute a record's hash from its fields (what someone covering their tracks would do)."""
    body = [int(str(value["seq"])).to_bytes(8, "big")]
    fields = (
        "time",
        "caller",
        "role",
        "operation",
        "product",
        "resource",
        "key_version",
        "outcome",
        "request_id",
    )
    for name in fields:
        data = str(value[name]).encode()
        body += [len(data).to_bytes(2, "big"), data]
    digest = hashlib.sha256(
        b"fwkms-audit-record/v1\x00" + bytes.fromhex(str(value["prev_hash"])) + b"".join(body)
    )
    return value | {"hash": digest.hexdigest()}


def edit(lines: list[str]) -> list[str]:
    i = _record_lines(lines)[4]  # record 5
    return _replace(lines, i, _with(lines[i], outcome="OK", caller="spiffe://kms.dev/auditor/dev"))


def delete(lines: list[str]) -> list[str]:
    i = _record_lines(lines)[6]  # record 7
    return lines[:i] + lines[i + 1 :]


def delete_last(lines: list[str]) -> list[str]:
    return lines[:-1]


def reorder(lines: list[str]) -> list[str]:
    i = _record_lines(lines)[2]  # records 3 and 4 swapped
    return [*lines[:i], lines[i + 1], lines[i], *lines[i + 2 :]]


def duplicate(lines: list[str]) -> list[str]:
    i = _record_lines(lines)[5]
    return _replace(lines, i, lines[i], lines[i])


def truncate(lines: list[str]) -> list[str]:
    return lines[: _record_lines(lines)[9]]  # records 10-12 gone; checkpoint 12 remains


def forge_checkpoint(lines: list[str]) -> list[str]:
    i = _checkpoint_lines(lines)[1]
    signature = json.loads(lines[i])["signature"]
    forged = ("00" if signature[:2] != "00" else "01") + signature[2:]
    return _replace(lines, i, _with(lines[i], signature=forged))


def checkpoint_of_another_key(lines: list[str]) -> list[str]:
    i = _checkpoint_lines(lines)[0]
    return _replace(lines, i, _with(lines[i], key_version="keys/kms-audit/versions/9"))


def unlink(lines: list[str]) -> list[str]:
    i = _record_lines(lines)[5]  # record 6 edited and rehashed: record 7 no longer chains
    return _replace(lines, i, json.dumps(_rehash(json.loads(lines[i]) | {"outcome": "OK"}), sort_keys=True))


def rewrite_tail(lines: list[str]) -> list[str]:
    """Records 9-12 rewritten with a recomputed chain: only checkpoint 12 can tell."""
    out = list(lines)
    indexes = _record_lines(lines)
    prev = json.loads(lines[indexes[7]])["hash"]
    for i in indexes[8:]:
        value = _rehash(json.loads(lines[i]) | {"prev_hash": prev, "caller": "spiffe://kms.dev/x/y"})
        out[i] = json.dumps(value, sort_keys=True, separators=(",", ":"))
        prev = value["hash"]
    return out


def malformed_record(lines: list[str]) -> list[str]:
    i = _record_lines(lines)[3]
    return _replace(lines, i, lines[i][:-5])


def malformed_checkpoint(lines: list[str]) -> list[str]:
    i = _checkpoint_lines(lines)[0]
    return _replace(lines, i, _with(lines[i], count=0))


def control_character(lines: list[str]) -> list[str]:
    i = _record_lines(lines)[1]
    return _replace(lines, i, _with(lines[i], resource="a\u202eb"))


def wrong_header(lines: list[str]) -> list[str]:
    return ['{"format":"fwkms-audit-export/v2","type":"header"}', *lines[1:]]


def untouched(lines: list[str]) -> list[str]:
    return list(lines)


TAMPERINGS: list[tuple[Callable[[list[str]], list[str]], str | None, int | None]] = [
    (untouched, None, None),
    (edit, "edited", 5),
    (delete, "deleted", 7),
    (delete_last, "truncated", 12),  # checkpoint 12 covers the last record
    (reorder, "reordered", 3),
    (duplicate, "reordered", 7),
    (truncate, "truncated", 10),
    (forge_checkpoint, "bad-signature", None),
    (checkpoint_of_another_key, "bad-signature", None),
    (unlink, "unlinked", 7),
    (rewrite_tail, "checkpoint-mismatch", None),
    (malformed_record, "malformed", 4),
    (malformed_checkpoint, "malformed", None),
    (control_character, "malformed", 2),
    (wrong_header, "malformed", None),
]


@pytest.mark.parametrize(
    ("tamper", "problem", "first_bad"), TAMPERINGS, ids=[t[0].__name__ for t in TAMPERINGS]
)
def test_client_and_server_verifiers_agree(
    export: list[str], tamper: Callable[[list[str]], list[str]], problem: str | None, first_bad: int | None
) -> None:
    lines = [line + "\n" for line in tamper(export)]
    server = verify_export(lines, checkpoint_verifier({KEY_VERSION: SIGNER.pem()}))
    client = verify_export_lines(lines, signature_check({KEY_VERSION: SIGNER.pem()}))
    assert (server.problem.value if server.problem else None) == problem
    assert client.problem == problem
    assert client.first_bad == server.first_bad == first_bad
    assert (client.verified, client.signed, client.checkpoint, client.head_hash) == (
        server.verified,
        server.signed,
        server.checkpoint,
        server.head_hash,
    )
    assert client.detail == server.detail or problem == "malformed"


def test_a_key_trusted_for_any_version_and_a_wrong_key(export: list[str]) -> None:
    lines = list(export)
    assert verify_export_lines(lines, signature_check(any_version=[SIGNER.pem()])).ok
    other = Signer()
    report = verify_export_lines(lines, signature_check(any_version=[other.pem()]))
    assert report.problem == "bad-signature" and report.checkpoint == 4


def test_checkpoints_kept_from_an_earlier_export_reveal_a_cut_end(export: list[str]) -> None:
    earlier = list(ExportReader(line + "\n" for line in export).checkpoints())
    cut = [line for line in export if '"type":"checkpoint"' not in line][:-3]  # checkpoints dropped too
    assert verify_export_lines(cut, signature_check({KEY_VERSION: SIGNER.pem()})).ok
    report = verify_export_lines(cut, signature_check({KEY_VERSION: SIGNER.pem()}), earlier)
    assert (report.problem, report.first_bad) == ("truncated", 10)


def test_no_kms_import_in_the_client_verifier() -> None:
    source = Path(__file__).resolve().parents[2] / "client" / "kmsctl"
    for name in ("_audit.py", "_audit_cli.py"):
        text = (source / name).read_text()
        assert "from kms." not in text and "import kms" not in text
