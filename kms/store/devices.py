"""``SqliteDeviceRepository``: the device registry (tables created by migration 2, see ``database.py``).

A device row holds the eFuse secret only wrapped under a KEK version (``wrapped_secret`` with its mechanism
and KEK key/version) plus its fingerprint; never the secret. ``add_many`` registers a batch in one
transaction and reports, per device, whether it was created, was already registered with the same secret
(fingerprints equal: a no-op), was re-provisioned (another secret while open for re-provisioning), or
conflicts (another secret: ``AlreadyExists``); the rules are ``kms.domain.devices.registration_outcome``.
Nothing is acknowledged before the commit.

Re-provisioning (migration 9 added ``reprovision_until``, ``reprovision_request`` and ``secret_generation``):
``open_reprovisioning`` opens the window; the registration that re-provisions replaces the secret, its wrap,
fingerprint and ECIES key, increments the generation and closes the window in the same statement, in the
write transaction that read the window (``BEGIN IMMEDIATE``: nothing interleaves), so one window admits one
new secret. ``revoke`` closes the window.
The same statement records who registered the new secret, when, and the approval request that opened the
window (migration 11: ``secret_registered_by``, ``secret_registered_at``, ``reprovisioned_under``); a new
row gets the registrar and moment of its registration there. ``registered_by``/``registered_at`` stay the
first registration.
Payload manifest signatures (``payload_signatures``) are kept: they cover the manifest, which names the
device but holds nothing derived from its secret; the payload key is derived from the stored secret at
every request.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kms.domain.devices import (
    Device,
    DeviceState,
    Registration,
    WrappedSecret,
    check_reprovisionable,
    registration_outcome,
    reprovisioned,
)
from kms.domain.errors import AlreadyExists, KmsError, NotFound
from kms.domain.kek_rotation import Rewrap, StoredSecret
from kms.store.database import Database, Row, Session, timestamp_text

_REPROVISION = """
UPDATE devices SET kek_key_id = ?, kek_version = ?, wrap_mechanism = ?, wrapped_secret = ?, fingerprint = ?,
                   ecies_public_key = ?, secret_generation = ?, reprovision_until = NULL,
                   reprovision_request = NULL, secret_registered_by = ?, secret_registered_at = ?,
                   reprovisioned_under = ?
WHERE device_id = ?
"""
_INSERT = """
INSERT INTO devices (device_id, product, chip, state, kek_key_id, kek_version, wrap_mechanism,
                     wrapped_secret, fingerprint, ecies_public_key, registered_by, registered_at,
                     secret_registered_by, secret_registered_at, reprovisioned_under)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


def _from_row(row: Row) -> Device:
    return Device(
        device_id=row.text("device_id"),
        product=row.text("product"),
        chip=row.text("chip"),
        state=row.enum("state", DeviceState),
        secret=WrappedSecret(
            kek_key_id=row.text("kek_key_id"),
            kek_version=row.integer("kek_version"),
            mechanism=row.text("wrap_mechanism"),
            blob=row.blob("wrapped_secret"),
        ),
        fingerprint=row.blob("fingerprint"),
        registered_by=row.text("registered_by"),
        registered_at=row.timestamp("registered_at"),
        ecies_public_key=row.optional_blob("ecies_public_key"),
        secret_generation=row.integer("secret_generation"),
        reprovision_until=_optional_timestamp(row, "reprovision_until"),
        reprovision_request=row.optional_text("reprovision_request"),
        secret_registered_by=row.optional_text("secret_registered_by"),
        secret_registered_at=_optional_timestamp(row, "secret_registered_at"),
        reprovisioned_under=row.optional_text("reprovisioned_under"),
    )


def _optional_timestamp(row: Row, column: str) -> datetime | None:
    return None if row.optional_text(column) is None else row.timestamp(column)


def _get(session: Session, device_id: str) -> Device | None:
    row = session.row("SELECT * FROM devices WHERE device_id = ?", [device_id])
    return None if row is None else _from_row(row)


class SqliteDeviceRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def get(self, device_id: str) -> Device:
        with self._db.snapshot() as session:
            device = _get(session, device_id)
        if device is None:
            raise NotFound(f"no device {device_id!r} is registered")
        return device

    def add_many(self, devices: Sequence[Device]) -> list[Registration | KmsError]:
        """Register a batch in one transaction; one outcome per device, in order."""
        outcomes: list[Registration | KmsError] = []
        with self._db.transaction() as session:
            for device in devices:
                existing = _get(session, device.device_id)
                outcome = registration_outcome(existing, device)
                if outcome is Registration.CREATED:
                    session.execute(_INSERT, _values(device))
                elif outcome is Registration.REPROVISIONED:
                    assert existing is not None
                    _reprovision(session, reprovisioned(existing, device))
                outcomes.append(outcome)
        return outcomes

    def open_reprovisioning(self, device_id: str, until: datetime, request_id: str) -> Device:
        """Open the device for re-provisioning until ``until`` (replacing an open window)."""
        with self._db.transaction() as session:
            device = _get(session, device_id)
            if device is None:
                raise NotFound(f"no device {device_id!r} is registered")
            check_reprovisionable(device)
            session.execute(
                "UPDATE devices SET reprovision_until = ?, reprovision_request = ? WHERE device_id = ?",
                [timestamp_text(until), request_id, device_id],
            )
            opened = _get(session, device_id)
        assert opened is not None
        return opened

    def revoke(self, device_id: str, at: datetime) -> Device:
        with self._db.transaction() as session:
            changed = session.execute(
                "UPDATE devices SET state = ?, revoked_at = COALESCE(revoked_at, ?), "
                "reprovision_until = NULL, reprovision_request = NULL WHERE device_id = ?",
                [DeviceState.REVOKED.value, timestamp_text(at), device_id],
            )
            if changed == 0:
                raise NotFound(f"no device {device_id!r} is registered")
            device = _get(session, device_id)
        assert device is not None
        return device

    def count(self, product: str | None = None) -> int:
        with self._db.snapshot() as session:
            row = session.row(
                "SELECT count(*) AS n FROM devices WHERE (:product IS NULL OR product = :product)",
                {"product": product},
            )
        return 0 if row is None else row.integer("n")

    def devices_under(
        self, kek_key_id: str, kek_version: int, limit: int, after_device_id: str = ""
    ) -> list[StoredSecret]:
        """Up to ``limit`` secrets wrapped under this KEK version, by device id after ``after_device_id``."""
        with self._db.snapshot() as session:
            return secrets_under(session, kek_key_id, kek_version, limit, after_device_id)

    def count_under(self, kek_key_id: str, kek_version: int) -> int:
        with self._db.snapshot() as session:
            return count_under(session, kek_key_id, kek_version)

    def rewrap(self, kek_key_id: str, rewraps: Sequence[Rewrap]) -> int:
        """Compare-and-set in one transaction: a row changes only if it still holds the version and blob
        read, so repeating a batch changes nothing. Returns the number of rows changed."""
        with self._db.transaction() as session:
            return rewrap_rows(session, kek_key_id, rewraps)

    def payload_signature(
        self, device_id: str, release: bytes, segment_size: int, key_version: str
    ) -> bytes | None:
        with self._db.snapshot() as session:
            row = session.row(
                "SELECT signature FROM payload_signatures "
                "WHERE device_id = ? AND release = ? AND segment_size = ? AND key_version = ?",
                [device_id, release, segment_size, key_version],
            )
        return None if row is None else row.blob("signature")

    def save_payload_signature(
        self,
        device_id: str,
        release: bytes,
        segment_size: int,
        key_version: str,
        signature: bytes,
        at: datetime,
    ) -> bytes:
        """Store a manifest signature unless one exists; return the stored one (first writer wins)."""
        with self._db.transaction() as session:
            session.execute(
                "INSERT OR IGNORE INTO payload_signatures (device_id, release, segment_size, key_version, "
                "signature, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [device_id, release, segment_size, key_version, signature, timestamp_text(at)],
            )
            row = session.row(
                "SELECT signature FROM payload_signatures "
                "WHERE device_id = ? AND release = ? AND segment_size = ? AND key_version = ?",
                [device_id, release, segment_size, key_version],
            )
        if row is None:
            raise AlreadyExists("the payload signature could not be stored")
        return row.blob("signature")


# -- KEK rotation: batch reads and compare-and-set rewrites (kms.domain.kek_rotation) -----------------------


def secrets_under(
    session: Session, kek_key_id: str, kek_version: int, limit: int, after_device_id: str
) -> list[StoredSecret]:
    rows = session.rows(
        "SELECT device_id, kek_version, wrapped_secret FROM devices "
        "WHERE kek_key_id = ? AND kek_version = ? AND device_id > ? ORDER BY device_id LIMIT ?",
        [kek_key_id, kek_version, after_device_id, limit],
    )
    return [
        StoredSecret(r.text("device_id"), r.integer("kek_version"), r.blob("wrapped_secret")) for r in rows
    ]


def count_under(session: Session, kek_key_id: str, kek_version: int) -> int:
    row = session.row(
        "SELECT count(*) AS n FROM devices WHERE kek_key_id = ? AND kek_version = ?",
        [kek_key_id, kek_version],
    )
    return 0 if row is None else row.integer("n")


def rewrap_rows(session: Session, kek_key_id: str, rewraps: Sequence[Rewrap]) -> int:
    """Store each new blob only where the row still holds the old version and blob; rows changed."""
    changed = 0
    for rewrap in rewraps:
        changed += session.execute(
            "UPDATE devices SET kek_version = ?, wrapped_secret = ? "
            "WHERE device_id = ? AND kek_key_id = ? AND kek_version = ? AND wrapped_secret = ?",
            [
                rewrap.new_version,
                rewrap.new_blob,
                rewrap.old.device_id,
                kek_key_id,
                rewrap.old.kek_version,
                rewrap.old.blob,
            ],
        )
    return changed


def _reprovision(session: Session, device: Device) -> None:
    session.execute(
        _REPROVISION,
        [
            device.secret.kek_key_id,
            device.secret.kek_version,
            device.secret.mechanism,
            device.secret.blob,
            device.fingerprint,
            device.ecies_public_key,
            device.secret_generation,
            device.secret_registered_by,
            _optional_timestamp_text(device.secret_registered_at),
            device.reprovisioned_under,
            device.device_id,
        ],
    )


def _values(device: Device) -> list[object]:
    return [
        device.device_id,
        device.product,
        device.chip,
        device.state.value,
        device.secret.kek_key_id,
        device.secret.kek_version,
        device.secret.mechanism,
        device.secret.blob,
        device.fingerprint,
        device.ecies_public_key,
        device.registered_by,
        timestamp_text(device.registered_at),
        device.secret_registered_by,
        _optional_timestamp_text(device.secret_registered_at),
        device.reprovisioned_under,
    ]


def _optional_timestamp_text(moment: datetime | None) -> str | None:
    return None if moment is None else timestamp_text(moment)
