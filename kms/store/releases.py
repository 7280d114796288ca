"""``SqliteReleaseRepository``: signed releases in SQLite, their images in a ``BlobStore``.

Tables (created by migration 1)::

    releases        output_sha256 BLOB PK, product, chip, version, secure_version, project_name,
                    input_sha256 BLOB, output_size, key_versions, signed_by, created_at;
                    UNIQUE INDEX (product, input_sha256, key_versions).
    product_floors  product PK, secure_version: the highest secure_version signed for the product, or lower
                    after an officers' lowering.
    signatures      the key-use records (see ``kms.store.signature_log``).

and by migration 9::

    floor_lowerings id PK, product, from_secure_version, to_secure_version, at, officer, approval_id: every
                    lowering of a floor under dual control; the last one per product is the floor's history.

``key_versions`` is the ordered list of key version names as canonical JSON (no spaces, ASCII), so equal
lists are equal text and the unique index identifies "this input signed with exactly these versions".

Recording a release (``record``):

1. If the release already exists (same product, input and key versions), return it; nothing is written.
2. Store the signed image in the blob store, durably (fsynced file and directory).
3. In ONE transaction: look again for the same release (another thread or process may have committed it
   meanwhile: then return that one and write nothing); insert the release, its key-use records, and raise
   the product's floor to ``max(floor, secure_version)``. Return after the commit (``synchronous=FULL``).

Because the image is stored before the transaction, a crash or a lost race in between leaves an
unreferenced image in the blob store (signatures are randomized, so the loser's image differs from the
winner's). That file is harmless garbage and is NOT deleted here: another writer may have stored the same
bytes and be about to commit a reference to them; only a collector that treats recently written files
(``BlobStore.put`` refreshes mtime) as live may remove unreferenced images. The converse never happens: a
committed release always has its image, so a missing or corrupted image is ``DataLoss``.

The same transaction refuses a release signed by a key whose Secure Boot V2 slot is revoked
(``kms.domain.sbv2_slots.check_release_keys``): the signing service reads revocations through a 1 s cache,
and this check makes "after revocation nothing is signed with that slot's key" hold for releases exactly.

Lowering a floor (``lower_floor``) reads the floor, checks it is still the one the approval request saw
(``kms.domain.releases.check_floor_unmoved``), sets it and records the lowering, all in ONE transaction, so a
release committed concurrently either raised the floor before (the lowering is refused) or checks its
secure_version against the lowered floor after.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence

from kms.domain.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound
from kms.domain.releases import (
    FloorLowering,
    Release,
    RollbackFloor,
    SignatureRecord,
    check_floor,
    check_floor_unmoved,
)
from kms.domain.sbv2_slots import check_release_keys
from kms.store.blobs import CHUNK_SIZE, BlobStore
from kms.store.database import Database, Row, Session, timestamp_text
from kms.store.signature_log import insert_signatures

_FIND = "SELECT * FROM releases WHERE product = ? AND input_sha256 = ? AND key_versions = ?"
_GET = "SELECT * FROM releases WHERE output_sha256 = ?"
_INSERT = """
INSERT INTO releases (output_sha256, product, chip, version, secure_version, project_name, input_sha256,
                      output_size, key_versions, signed_by, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_RAISE_FLOOR = """
INSERT INTO product_floors (product, secure_version) VALUES (?, ?)
ON CONFLICT (product) DO UPDATE SET secure_version = max(secure_version, excluded.secure_version)
"""


_FLOOR = "SELECT secure_version FROM product_floors WHERE product = ?"
_LAST_LOWERING = "SELECT * FROM floor_lowerings WHERE product = ? ORDER BY id DESC LIMIT 1"
_INSERT_LOWERING = """
INSERT INTO floor_lowerings (product, from_secure_version, to_secure_version, at, officer, approval_id)
VALUES (?, ?, ?, ?, ?, ?)
"""


def encode_key_versions(key_versions: Sequence[str]) -> str:
    """The canonical text of an ordered list of key version names."""
    return json.dumps(list(key_versions), separators=(",", ":"), ensure_ascii=True)


def _decode_key_versions(text: str) -> tuple[str, ...]:
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataLoss("stored data is unreadable: key_versions of a release")
    return tuple(names)


def _release_from_row(row: Row) -> Release:
    return Release(
        product=row.text("product"),
        chip=row.text("chip"),
        version=row.text("version"),
        secure_version=row.integer("secure_version"),
        project_name=row.text("project_name"),
        input_sha256=row.blob("input_sha256"),
        output_sha256=row.blob("output_sha256"),
        output_size=row.integer("output_size"),
        key_versions=_decode_key_versions(row.text("key_versions")),
        signed_by=row.text("signed_by"),
        created_at=row.timestamp("created_at"),
    )


_REVOKED_SLOT_KEYS = "SELECT key_id FROM sbv2_slot_revocations WHERE product = ?"


def _find(session: Session, product: str, input_sha256: bytes, key_versions: Sequence[str]) -> Release | None:
    row = session.row(_FIND, [product, input_sha256, encode_key_versions(key_versions)])
    return None if row is None else _release_from_row(row)


def _floor(session: Session, product: str) -> int | None:
    row = session.row(_FLOOR, [product])
    return None if row is None else row.integer("secure_version")


def _rollback_floor(session: Session, product: str) -> RollbackFloor:
    lowering = session.row(_LAST_LOWERING, [product])
    if lowering is None:
        return RollbackFloor(product, _floor(session, product))
    return RollbackFloor(
        product,
        _floor(session, product),
        lowered_at=lowering.timestamp("at"),
        lowered_by=lowering.text("officer"),
        lowering_request=lowering.text("approval_id"),
    )


class SqliteReleaseRepository:
    """``kms.domain.ports.ReleaseRepository`` on a ``Database`` and a ``BlobStore``."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self._db = db
        self._blobs = blobs

    def find(self, product: str, input_sha256: bytes, key_versions: Sequence[str]) -> Release | None:
        with self._db.snapshot() as session:
            return _find(session, product, input_sha256, key_versions)

    def get(self, output_sha256: bytes) -> Release:
        with self._db.snapshot() as session:
            row = session.row(_GET, [output_sha256])
        if row is None:
            raise NotFound(f"release releases/{output_sha256.hex()} does not exist")
        return _release_from_row(row)

    def secure_version_floor(self, product: str) -> int | None:
        with self._db.snapshot() as session:
            return _floor(session, product)

    def rollback_floor(self, product: str) -> RollbackFloor:
        with self._db.snapshot() as session:
            return _rollback_floor(session, product)

    def lower_floor(self, lowering: FloorLowering) -> RollbackFloor:
        """Lower the floor if it is still ``lowering.from_secure_version`` (see the module docstring)."""
        with self._db.transaction() as session:
            check_floor_unmoved(lowering, _floor(session, lowering.product))
            session.execute(
                "UPDATE product_floors SET secure_version = ? WHERE product = ?",
                [lowering.to_secure_version, lowering.product],
            )
            session.execute(
                _INSERT_LOWERING,
                [
                    lowering.product,
                    lowering.from_secure_version,
                    lowering.to_secure_version,
                    timestamp_text(lowering.at),
                    lowering.officer,
                    lowering.request_id,
                ],
            )
            return _rollback_floor(session, lowering.product)

    def record(self, release: Release, signed_image: bytes, signatures: Sequence[SignatureRecord]) -> Release:
        if (
            hashlib.sha256(signed_image).digest() != release.output_sha256
            or len(signed_image) != release.output_size
        ):
            raise InvalidArgument(f"the image given for {release.name} does not match its SHA-256 and size")
        existing = self.find(release.product, release.input_sha256, release.key_versions)
        if existing is not None:
            return existing
        self._blobs.put(signed_image, sha256=release.output_sha256)  # verified just above
        with self._db.transaction() as session:
            existing = _find(session, release.product, release.input_sha256, release.key_versions)
            if existing is not None:
                return existing
            check_floor(release.product, release.secure_version, _floor(session, release.product))
            revoked = session.rows(_REVOKED_SLOT_KEYS, [release.product])
            check_release_keys(release.key_versions, {row.text("key_id") for row in revoked})
            if session.row("SELECT 1 FROM releases WHERE output_sha256 = ?", [release.output_sha256]):
                raise AlreadyExists(f"{release.name} is already recorded for another input or product")
            session.execute(
                _INSERT,
                [
                    release.output_sha256,
                    release.product,
                    release.chip,
                    release.version,
                    release.secure_version,
                    release.project_name,
                    release.input_sha256,
                    release.output_size,
                    encode_key_versions(release.key_versions),
                    release.signed_by,
                    timestamp_text(release.created_at),
                ],
            )
            insert_signatures(session, signatures)
            session.execute(_RAISE_FLOOR, [release.product, release.secure_version])
        return release

    def image_view(self, output_sha256: bytes) -> memoryview:
        """A read-only view of a release's stored image (memory-mapped; the caller verifies its SHA-256)."""
        self.get(output_sha256)
        return self._blobs.map(output_sha256)

    def read_image(self, output_sha256: bytes, offset: int = 0) -> bytes:
        return b"".join(self.image_chunks(output_sha256, offset))

    def image_chunks(
        self, output_sha256: bytes, offset: int = 0, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        """The stored image from ``offset`` in verified pieces, for streaming (see ``BlobStore.chunks``)."""
        release = self.get(output_sha256)
        try:
            return self._blobs.chunks(output_sha256, offset, chunk_size=chunk_size)
        except NotFound:
            raise DataLoss(f"the signed image of {release.name} is missing from the release store") from None
