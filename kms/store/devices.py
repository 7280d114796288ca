"""``SqliteDeviceRepository``: the device registry (tables created by migration 2, see ``database.py``).

A device row holds the eFuse secret only wrapped under a KEK version (``wrapped_secret`` with its mechanism
and KEK key/version) plus its fingerprint; never the secret. ``add_many`` registers a batch in one
transaction and reports, per device, whether it was created, was already registered with the same secret
(fingerprints equal: a no-op), or conflicts (another secret: ``AlreadyExists``). Nothing is acknowledged
before the commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from kms.domain.devices import Device, DeviceState, Registration, WrappedSecret
from kms.domain.errors import AlreadyExists, KmsError, NotFound
from kms.domain.kek_rotation import Rewrap, StoredSecret
from kms.store.database import Database, Row, Session, timestamp_text

_INSERT = """
INSERT INTO devices (device_id, product, chip, state, kek_key_id, kek_version, wrap_mechanism,
                     wrapped_secret, fingerprint, ecies_public_key, registered_by, registered_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    )


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
                if existing is None:
                    session.execute(_INSERT, _values(device))
                    outcomes.append(Registration.CREATED)
                elif existing.fingerprint == device.fingerprint and existing.product == device.product:
                    outcomes.append(Registration.UNCHANGED)
                else:
                    outcomes.append(
                        AlreadyExists(
                            f"device {device.device_id!r} is already registered with a different secret or "
                            "product; re-provisioning is a security officer's act"
                        )
                    )
        return outcomes

    def revoke(self, device_id: str, at: datetime) -> Device:
        with self._db.transaction() as session:
            changed = session.execute(
                "UPDATE devices SET state = ?, revoked_at = COALESCE(revoked_at, ?) WHERE device_id = ?",
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
    ]
