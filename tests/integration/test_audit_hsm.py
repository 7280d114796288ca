"""Audit checkpoints signed by a SoftHSM2 P-256 key through ``Pkcs11Hsm``, verified with ``cryptography``.

The signatures are checked here without ``kms.domain.audit.checkpoint_verifier`` too: SHA-256 of the note,
raw r || s turned into DER, ``ECDSA(Prehashed(SHA256))``, as an auditor's own tool would.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from kms.domain.audit import (
    AuditEvent,
    Checkpoint,
    HsmCheckpointSigner,
    Problem,
    checkpoint_verifier,
    verify_export,
)
from kms.domain.keys import Algorithm
from kms.domain.ports import GeneratedKeyPair
from kms.hsm.pkcs11_hsm import Pkcs11Hsm
from kms.store.audit import SqliteAuditLog, read_checkpoints, verify_database, write_export
from kms.store.database import Database

pytestmark = pytest.mark.integration

P256 = Algorithm.ECDSA_P256_SHA256
KEY_VERSION = "keys/audit/versions/1"


@pytest.fixture
def audit_key(hsm: Pkcs11Hsm) -> Iterator[GeneratedKeyPair]:
    pair = hsm.generate_key_pair(P256, "audit test")
    yield pair
    hsm.destroy_key_pair(pair.hsm_id)


def event(name: str) -> AuditEvent:
    return AuditEvent(
        time=datetime.now(UTC),
        caller="spiffe://kms.example/build-server/ci-1",
        role="build-server",
        operation="/kmsapi.v1.SigningService/SignDigest",
        outcome="OK",
        request_id=name,
        key_version="keys/fw-sign/versions/1",
    )


def independently_valid(public_key_der: bytes, checkpoint: Checkpoint) -> bool:
    key = serialization.load_der_public_key(public_key_der)
    assert isinstance(key, ec.EllipticCurvePublicKey) and len(checkpoint.signature) == 64
    r, s = (int.from_bytes(checkpoint.signature[i : i + 32], "big") for i in (0, 32))
    digest = hashlib.sha256(checkpoint.note()).digest()
    try:
        key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


def test_checkpoints_signed_in_the_hsm_verify_offline(
    hsm: Pkcs11Hsm, audit_key: GeneratedKeyPair, tmp_path: Path
) -> None:
    path = tmp_path / "kms.db"
    signer = HsmCheckpointSigner(hsm, audit_key.hsm_id, KEY_VERSION)
    with Database.open(path) as db:
        log = SqliteAuditLog(db, signer, checkpoint_every=10, checkpoint_interval=3600)
        with ThreadPoolExecutor(5) as pool:
            list(pool.map(lambda n: log.append(event(f"r{n}")), range(35)))
        log.close()
        checkpoints = read_checkpoints(db)
        export = io.StringIO()
        write_export(db, export)

    assert checkpoints[-1].count == 35 and len(checkpoints) >= 2
    assert all(independently_valid(audit_key.public_key_der, c) for c in checkpoints)
    keys = {KEY_VERSION: audit_key.public_key_der}
    report = verify_database(path, keys)
    assert report.ok and (report.verified, report.signed) == (35, 35)

    offline = checkpoint_verifier({KEY_VERSION: audit_key.public_key_der})
    assert verify_export(io.StringIO(export.getvalue()), offline).ok

    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE audit_records SET outcome = 'NOT_FOUND' WHERE seq = 17")
    conn.close()
    report = verify_database(path, keys)
    assert (report.problem, report.first_bad) == (Problem.EDITED, 17)


def test_checkpointing_while_other_threads_sign_with_the_same_hsm(
    hsm: Pkcs11Hsm, audit_key: GeneratedKeyPair, tmp_path: Path
) -> None:
    """PKCS#11 calls from the checkpointer and from signing threads share the HSM safely."""
    other = hsm.generate_key_pair(P256, "signing test")
    stop = threading.Event()
    signatures = 0

    def sign_digests() -> None:
        nonlocal signatures
        while not stop.is_set():
            hsm.sign_digest(other.hsm_id, P256, hashlib.sha256(b"firmware").digest())
            signatures += 1

    signer = HsmCheckpointSigner(hsm, audit_key.hsm_id, KEY_VERSION)
    try:
        with Database.open(tmp_path / "kms.db") as db:
            log = SqliteAuditLog(db, signer, checkpoint_every=3, checkpoint_interval=0.01)
            signing = [threading.Thread(target=sign_digests) for _ in range(4)]
            for thread in signing:
                thread.start()
            deadline, appended = time.monotonic() + 30, 0
            with ThreadPoolExecutor(8) as pool:
                while len(read_checkpoints(db)) < 20 and time.monotonic() < deadline:
                    list(pool.map(lambda n: log.append(event(f"r{n}")), range(appended, appended + 40)))
                    appended += 40
            stop.set()
            for thread in signing:
                thread.join()
            log.close()
            checkpoints = read_checkpoints(db)
    finally:
        stop.set()
        hsm.destroy_key_pair(other.hsm_id)
    assert signatures > 0 and len(checkpoints) >= 20 and checkpoints[-1].count == appended
    report = verify_database(tmp_path / "kms.db", {KEY_VERSION: audit_key.public_key_der})
    assert report.ok and report.signed == appended
