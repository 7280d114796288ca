"""The audit log end to end: a real server records every call; kmsctl exports and verifies it as subprocesses.

The server runs on its own state directory, because the tests edit its SQLite file behind its back, as an
intruder with file access would. The database is in WAL mode, so a second connection can commit an edit
while the server runs; the server's later reads (the next export) see it. Editing a record in the middle
leaves the log's last record alone, so the server keeps appending (it refuses to only when the head changed).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsctl import errors
from tests.support.kms_server import KeySpec, RunningKms, running_kms

KEY = KeySpec("audit-e2e", "audit-e2e", "ecdsa-p256", None, "digest-signing")
SIGN_DIGEST = "/kmsapi.v1.SigningService/SignDigest"
EXPORT = "/kmsapi.v1.AuditService/ExportAuditLog"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    """A server that made some calls and was restarted: its orderly stop signed a checkpoint."""
    state = tmp_path_factory.mktemp("kms-audit")
    with running_kms(state, [KEY]) as first:
        _sign_some(first)
    with running_kms(state, init=False) as running:
        yield running


def _records(path: Path) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["type"] == "record"]


def _sign_some(server: RunningKms) -> None:
    with server.client("build-server") as client:
        for n in range(3):
            client.sign_digest(f"keys/{KEY.key_id}", bytes([n]) * 32)
    with server.client("auditor") as client, pytest.raises(errors.PermissionDeniedError):
        client.sign_digest(f"keys/{KEY.key_id}", bytes(32))


def test_export_and_verify_then_a_tampered_record_is_named(server: RunningKms, tmp_path: Path) -> None:
    first = tmp_path / "first.jsonl"
    result = server.kmsctl("audit", "export", "-o", str(first))
    assert result.returncode == 0, result.stderr
    records = _records(first)
    ops = [(r["role"], r["operation"], r["outcome"]) for r in records]
    assert ("build-server", SIGN_DIGEST, "OK") in ops
    assert ("auditor", SIGN_DIGEST, "PERMISSION_DENIED") in ops
    signed = next(r for r in records if r["operation"] == SIGN_DIGEST and r["outcome"] == "OK")
    assert signed["resource"] == f"keys/{KEY.key_id}"
    assert signed["key_version"] == f"keys/{KEY.key_id}/versions/1"
    assert all("signature" not in r and len(str(r["request_id"])) >= 1 for r in records)

    verified = server.kmsctl("audit", "verify", str(first), "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] and report["verified"] == len(records)
    assert report["signed"] >= 4 and report["checkpoints"] >= 1  # the checkpoint of the first run's stop
    assert report["public_keys_from_server"] == ["keys/kms-audit/versions/1"]

    # Offline, with the key pinned: no server needed at all.
    pem = tmp_path / "audit.pem"
    assert server.kmsctl("public-key", "kms-audit", "-o", str(pem)).returncode == 0
    offline = server.kmsctl(
        "audit", "verify", str(first), "--public-key", str(pem), "--server", "127.0.0.1:9"
    )
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.startswith("OK: ")

    # Straight from the server.
    live = server.kmsctl("audit", "verify", "--public-key", str(pem))
    assert live.returncode == 0, live.stderr

    # Someone with access to the file turns the refused call into a successful one.
    denied = next(r for r in records if r["outcome"] == "PERMISSION_DENIED")
    with sqlite3.connect(server.state_dir / "kms.db", timeout=30) as db:
        db.execute("UPDATE audit_records SET outcome = 'OK' WHERE seq = ?", (denied["seq"],))
    db.close()
    second = tmp_path / "second.jsonl"
    assert server.kmsctl("audit", "export", "-o", str(second)).returncode == 0
    tampered = server.kmsctl("audit", "verify", str(second), "--public-key", str(pem))
    assert tampered.returncode == 8, tampered.stdout + tampered.stderr
    assert f"first bad record: {denied['seq']}" in tampered.stderr
    assert "FAILED (edited)" in tampered.stderr
    as_json = json.loads(
        server.kmsctl("audit", "verify", str(second), "--public-key", str(pem), "--json").stdout
    )
    assert (as_json["problem"], as_json["first_bad"]) == ("edited", denied["seq"])


def test_only_auditors_and_officers_read_the_log(server: RunningKms, tmp_path: Path) -> None:
    for command in (["export", "-o", str(tmp_path / "x.jsonl")], ["tail"]):
        result = server.kmsctl("audit", *command, role="build-server")
        assert result.returncode == 6, result.stderr
        assert "may not call" in result.stderr
    assert not (tmp_path / "x.jsonl").exists()
    officer = server.kmsctl("audit", "tail", "-n", "50", "--json", role="security-officer")
    assert officer.returncode == 0, officer.stderr
    shown = json.loads(officer.stdout)["records"]
    refused = [r for r in shown if r["operation"] == EXPORT and r["role"] == "build-server"]
    assert refused and refused[-1]["outcome"] == "PERMISSION_DENIED"
    assert refused[-1]["caller"] == "spiffe://kms.dev/build-server/dev"


def test_tail_shows_the_last_records(server: RunningKms) -> None:
    with server.client("build-server") as client:
        client.list_keys("audit-e2e")
    result = server.kmsctl("audit", "tail", "-n", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 1 <= len(lines) <= 3
    assert any("/kmsapi.v1.KeyService/ListKeys" in line and "audit-e2e" in line for line in lines)
