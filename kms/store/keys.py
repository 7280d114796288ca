"""``SqliteKeyRepository``: keys and key versions in SQLite (tables created by migration 1).

Tables::

    keys          key_id PK, product, purpose, algorithm, sbv2_slot (0-2 or NULL), primary_version,
                  created_at; UNIQUE (product, sbv2_slot): one Secure Boot V2 key per slot and product
                  (NULL slots are distinct, so other keys never compete).
    key_versions  (key_id, version) PK, key_id REFERENCES keys, algorithm, state, hsm_id BLOB UNIQUE
                  (one HSM key pair backs one version), public_key_der BLOB, created_at.

Enums are stored by their ``value`` (``Algorithm.value`` etc.), timestamps as ISO-8601 UTC text with
microseconds. Every write is one transaction that checks its constraints first (inside ``BEGIN
IMMEDIATE``, so the check cannot race another writer) and raises ``AlreadyExists``/``NotFound`` with a
message naming the key. Every read is one snapshot; nothing is cached, so another process's changes (the
CLI creating a key) are seen at once.
"""

from __future__ import annotations

from collections import defaultdict

from kms.domain.errors import AlreadyExists, InvalidArgument, NotFound
from kms.domain.keys import Algorithm, Key, KeyName, KeyPurpose, KeyVersion, KeyVersionState
from kms.store.database import Database, Row, Session, timestamp_text

# One query for every read; NULL parameters mean "any".
_KEYS = """
SELECT * FROM keys
WHERE (:key_id IS NULL OR key_id = :key_id)
  AND (:product IS NULL OR product = :product)
  AND (NOT :sbv2_only OR sbv2_slot IS NOT NULL)
ORDER BY product, key_id
"""
_VERSIONS = """
SELECT v.* FROM key_versions AS v JOIN keys AS k USING (key_id)
WHERE (:key_id IS NULL OR k.key_id = :key_id)
  AND (:product IS NULL OR k.product = :product)
  AND (NOT :sbv2_only OR k.sbv2_slot IS NOT NULL)
ORDER BY v.key_id, v.version
"""


def _version_from_row(row: Row) -> KeyVersion:
    return KeyVersion(
        key_id=row.text("key_id"),
        version=row.integer("version"),
        algorithm=row.enum("algorithm", Algorithm),
        state=row.enum("state", KeyVersionState),
        hsm_id=row.blob("hsm_id"),
        public_key_der=row.blob("public_key_der"),
        created_at=row.timestamp("created_at"),
    )


def _load(
    session: Session, key_id: str | None = None, product: str | None = None, sbv2_only: bool = False
) -> list[Key]:
    params: dict[str, object] = {"key_id": key_id, "product": product, "sbv2_only": sbv2_only}
    versions: defaultdict[str, list[KeyVersion]] = defaultdict(list)
    for row in session.rows(_VERSIONS, params):
        version = _version_from_row(row)
        versions[version.key_id].append(version)
    return [
        Key(
            key_id=row.text("key_id"),
            product=row.text("product"),
            purpose=row.enum("purpose", KeyPurpose),
            algorithm=row.enum("algorithm", Algorithm),
            sbv2_slot=row.optional_integer("sbv2_slot"),
            primary_version=row.integer("primary_version"),
            versions=tuple(versions[row.text("key_id")]),
            created_at=row.timestamp("created_at"),
        )
        for row in session.rows(_KEYS, params)
    ]


def _insert_version(session: Session, version: KeyVersion) -> None:
    if session.row(
        "SELECT 1 FROM key_versions WHERE key_id = ? AND version = ?", [version.key_id, version.version]
    ):
        raise AlreadyExists(f"key version {version.name} already exists")
    holder = session.row("SELECT key_id, version FROM key_versions WHERE hsm_id = ?", [version.hsm_id])
    if holder is not None:
        other = KeyName(holder.text("key_id"), holder.integer("version"))
        raise AlreadyExists(f"the HSM key pair of {version.name} already backs {other}")
    session.execute(
        "INSERT INTO key_versions (key_id, version, algorithm, state, hsm_id, public_key_der, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            version.key_id,
            version.version,
            version.algorithm.value,
            version.state.value,
            version.hsm_id,
            version.public_key_der,
            timestamp_text(version.created_at),
        ],
    )


class SqliteKeyRepository:
    """``kms.domain.ports.KeyRepository`` on a ``Database``."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add_key(self, key: Key) -> None:
        if any(v.key_id != key.key_id for v in key.versions):
            raise InvalidArgument(f"every version of key {key.name} must belong to it")
        if key.primary_version not in {v.version for v in key.versions}:
            raise InvalidArgument(f"key {key.name} has no version {key.primary_version} to make primary")
        with self._db.transaction() as session:
            if session.row("SELECT 1 FROM keys WHERE key_id = ?", [key.key_id]):
                raise AlreadyExists(f"key {key.name} already exists")
            if key.sbv2_slot is not None:
                holder = session.row(
                    "SELECT key_id FROM keys WHERE product = ? AND sbv2_slot = ?",
                    [key.product, key.sbv2_slot],
                )
                if holder is not None:
                    raise AlreadyExists(
                        f"product {key.product!r} already has a Secure Boot V2 key in slot {key.sbv2_slot}: "
                        f"{KeyName(holder.text('key_id'))}"
                    )
            session.execute(
                "INSERT INTO keys (key_id, product, purpose, algorithm, sbv2_slot, primary_version, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    key.key_id,
                    key.product,
                    key.purpose.value,
                    key.algorithm.value,
                    key.sbv2_slot,
                    key.primary_version,
                    timestamp_text(key.created_at),
                ],
            )
            for version in key.versions:
                _insert_version(session, version)

    def get_key(self, key_id: str) -> Key:
        with self._db.snapshot() as session:
            keys = _load(session, key_id=key_id)
        if not keys:
            raise NotFound(f"key {KeyName(key_id)} does not exist")
        return keys[0]

    def list_keys(self, product: str | None = None) -> list[Key]:
        with self._db.snapshot() as session:
            return _load(session, product=product)

    def sbv2_keys(self, product: str) -> list[Key]:
        with self._db.snapshot() as session:
            keys = _load(session, product=product, sbv2_only=True)
        return sorted(keys, key=lambda k: k.sbv2_slot or 0)

    def add_version(self, key_id: str, version: KeyVersion, make_primary: bool) -> None:
        if version.key_id != key_id:
            raise InvalidArgument(f"key version {version.name} does not belong to key {KeyName(key_id)}")
        with self._db.transaction() as session:
            if session.row("SELECT 1 FROM keys WHERE key_id = ?", [key_id]) is None:
                raise NotFound(f"key {KeyName(key_id)} does not exist")
            _insert_version(session, version)
            if make_primary:
                session.execute(
                    "UPDATE keys SET primary_version = ? WHERE key_id = ?", [version.version, key_id]
                )
