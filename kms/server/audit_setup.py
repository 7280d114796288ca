"""Opening the service's audit log: the system audit key in the HSM, and ``SqliteAuditLog`` signing with it.

The audit key is ``keys/kms-audit`` of product ``kms`` (``SYSTEM_PRODUCT``), purpose ``audit-checkpoint``,
ECDSA P-256. ``open_audit_log`` creates it on first start (``KeyAdministration.create_key``: generated inside
the HSM, recorded in the key table) and signs checkpoints with its primary version from then on; a rotated
key is picked up at the next start. Its public key is public information (``KeyService.GetPublicKey``), which
is what an auditor verifies exports with; pinning it out of band makes the check independent of the server.
"""

from __future__ import annotations

from typing import Any

from kms.domain.audit import HsmCheckpointSigner
from kms.domain.errors import FailedPrecondition, NotFound
from kms.domain.keys import SYSTEM_PRODUCT, Algorithm, Key, KeyPurpose, KeyVersionState
from kms.domain.ports import Hsm, KeyRepository
from kms.service.keys import KeyAdministration
from kms.store.audit import SqliteAuditLog
from kms.store.database import Database

AUDIT_KEY_ID = "kms-audit"
AUDIT_KEY_NAME = f"keys/{AUDIT_KEY_ID}"


def ensure_audit_key(hsm: Hsm, keys: KeyRepository) -> Key:
    """The audit key, created in the HSM if it does not exist yet. ``FailedPrecondition`` if a key of that
    id exists with another product, purpose or algorithm."""
    try:
        key = keys.get_key(AUDIT_KEY_ID)
    except NotFound:
        key = KeyAdministration(hsm, keys).create_key(
            AUDIT_KEY_ID, SYSTEM_PRODUCT, KeyPurpose.AUDIT_CHECKPOINT, Algorithm.ECDSA_P256_SHA256, None
        )
    if (key.product, key.purpose, key.algorithm) != (
        SYSTEM_PRODUCT,
        KeyPurpose.AUDIT_CHECKPOINT,
        Algorithm.ECDSA_P256_SHA256,
    ):
        raise FailedPrecondition(
            f"{AUDIT_KEY_NAME} exists but is not the {SYSTEM_PRODUCT!r} audit-checkpoint ECDSA P-256 key"
        )
    return key


def audit_signer(hsm: Hsm, keys: KeyRepository) -> HsmCheckpointSigner:
    """A checkpoint signer over the audit key's primary version (created if absent)."""
    version = ensure_audit_key(hsm, keys).version()
    if version.state is not KeyVersionState.ENABLED:
        raise FailedPrecondition(f"the audit key's primary version {version.name} is {version.state.value}")
    return HsmCheckpointSigner(hsm, version.hsm_id, version.name)


def open_audit_log(hsm: Hsm, keys: KeyRepository, db: Database, **options: Any) -> SqliteAuditLog:
    """The service's audit log on ``db``, checkpoints signed by the audit key in ``hsm``.

    ``options`` go to ``SqliteAuditLog`` (``checkpoint_every``, ``checkpoint_interval``, ...). Close the log
    before the database and the HSM: closing signs a final checkpoint.
    """
    return SqliteAuditLog(db, audit_signer(hsm, keys), **options)
