"""Persistence adapters: SQLite through sqlite-utils, and a content-addressed store of signed images.

- ``database``: ``Database`` (connections, durability settings, threading model, migrations) and the
  translation of SQLite errors into domain errors;
- ``keys``: ``SqliteKeyRepository``;
- ``releases``: ``SqliteReleaseRepository`` (release rows, key-use records and anti-rollback floors in one
  transaction, images in the ``BlobStore``);
- ``blobs``: ``BlobStore``, atomic and verified files named by their SHA-256;
- ``signature_log``: ``SqliteSignatureLog``, key-use records with group commit.

Importing this package opens nothing; ``Database.open`` does, where the server composes its parts.
"""

from kms.store.blobs import BlobStore
from kms.store.database import Database, Migration, SchemaTooNew, StorageFailure
from kms.store.keys import SqliteKeyRepository
from kms.store.releases import SqliteReleaseRepository
from kms.store.signature_log import SqliteSignatureLog

__all__ = [
    "BlobStore",
    "Database",
    "Migration",
    "SchemaTooNew",
    "SqliteKeyRepository",
    "SqliteReleaseRepository",
    "SqliteSignatureLog",
    "StorageFailure",
]
