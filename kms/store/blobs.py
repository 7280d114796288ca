"""A content-addressed store of signed images on disk.

Layout: ``ROOT/sha256/ab/cdef...`` where ``abcdef...`` is the hex SHA-256 of the file's content. Files are
immutable and read-only (mode 0444) once under their final name.

Writing (``put``) is atomic and durable: the content goes to a temporary file ``.tmp-*`` in the final
directory, which is fsynced, renamed over the final name (``os.replace``, atomic on POSIX), and the
directory is fsynced so the new name survives a power loss; directories created on the way are fsynced
into their parents too. A crash at any moment leaves either no file under the final name or the complete
one, plus possibly a stale ``.tmp-*`` file that ``sweep_temporary_files`` removes. ``put`` of content
already present verifies the stored copy (and replaces it if it is corrupted) and refreshes its mtime, so a
future garbage collector with a grace period never removes a file that a writer has just relied upon.

Reading (``read``, ``chunks``) always verifies the SHA-256 of the whole file, even for a range: the file is
hashed from its start, the requested range is yielded, and the LAST piece is held back until the hash
matched, so a reader never receives a complete corrupted image (``DataLoss`` instead). Images are bounded
(flash size), so hashing a whole file per read is cheap (SHA-256 runs at about 1-2 GB/s).

Thread- and process-safe without locks: concurrent ``put`` of the same content write separate temporary
files and rename the same bytes onto the same name.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from kms.domain.errors import DataLoss, InvalidArgument, NotFound
from kms.store.database import StorageFailure

CHUNK_SIZE = 64 * 1024
_TEMPORARY_PREFIX = ".tmp-"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> bytes | None:
    """The SHA-256 of the file, or None if there is no such file."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    except FileNotFoundError:
        return None


class BlobStore:
    """Signed images by SHA-256 under ``root`` (created on first ``put``; nothing is touched before)."""

    def __init__(self, root: str | Path) -> None:
        self._root = Path(root)

    @property
    def root(self) -> Path:
        return self._root

    def _path(self, sha256: bytes) -> Path:
        if len(sha256) != 32:
            raise InvalidArgument(f"a SHA-256 digest has 32 bytes, not {len(sha256)}")
        name = sha256.hex()
        return self._root / "sha256" / name[:2] / name[2:]

    def map(self, sha256: bytes) -> memoryview:
        """A read-only memory map of a stored blob (``NotFound`` if absent). Not verified: the caller hashes.

        Pages are shared through the page cache by every reader of the process, so serving one image to many
        clients costs its size once, not once per client.
        """
        path = self._path(sha256)
        try:
            with path.open("rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return memoryview(b"")
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise NotFound(f"no stored image has SHA-256 {sha256.hex()}") from None
        except OSError as e:
            raise StorageFailure("a stored image could not be read") from e
        return memoryview(mapped)

    def put(self, data: bytes, *, sha256: bytes | None = None) -> bytes:
        """Store ``data`` durably; return its SHA-256. Idempotent.

        ``sha256``, when given, is the caller's already-verified digest of ``data`` (saves a pass over it).
        """
        digest = sha256 if sha256 is not None else hashlib.sha256(data).digest()
        final = self._path(digest)
        try:
            if _hash_file(final) == digest:
                os.utime(final)
                return digest
            self._make_directories(final.parent)
            fd, name = tempfile.mkstemp(prefix=_TEMPORARY_PREFIX, dir=final.parent)
            temporary = Path(name)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fchmod(f.fileno(), 0o444)
                    os.fsync(f.fileno())
                temporary.replace(final)
            except BaseException:
                with contextlib.suppress(OSError):
                    temporary.unlink()
                raise
            _fsync_directory(final.parent)
        except OSError as e:
            raise StorageFailure("the signed image could not be stored") from e
        return digest

    def _make_directories(self, directory: Path) -> None:
        missing: list[Path] = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                new.mkdir()
            _fsync_directory(new.parent)

    def exists(self, sha256: bytes) -> bool:
        """True if a file is stored under this digest (its content is not checked)."""
        return self._path(sha256).is_file()

    def read(self, sha256: bytes, offset: int = 0, length: int | None = None) -> bytes:
        """The stored bytes ``[offset, offset + length)`` (to the end if ``length`` is None), verified."""
        return b"".join(self.chunks(sha256, offset, length))

    def chunks(
        self, sha256: bytes, offset: int = 0, length: int | None = None, chunk_size: int = CHUNK_SIZE
    ) -> Iterator[bytes]:
        """Stream a verified range in pieces of at most ``chunk_size`` bytes.

        ``NotFound`` and ``InvalidArgument`` (a range beyond the end) are raised here, before iteration;
        ``DataLoss`` is raised by the iterator before it yields the range's last piece.
        """
        path = self._path(sha256)
        if offset < 0 or (length is not None and length < 0) or chunk_size < 1:
            raise InvalidArgument("offset, length and chunk size must not be negative")
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"no stored image has SHA-256 {sha256.hex()}") from None
        except OSError as e:
            raise StorageFailure("the stored image could not be read") from e
        size = os.fstat(f.fileno()).st_size
        if offset > size:
            f.close()
            raise InvalidArgument(f"offset {offset} is beyond the end of the image ({size} bytes)")
        end = size if length is None else min(size, offset + length)
        return self._verified_range(f, sha256, offset, end, chunk_size)

    @staticmethod
    def _verified_range(f: BinaryIO, sha256: bytes, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        hasher = hashlib.sha256()
        position = 0
        held: bytes | None = None
        try:
            with f:
                while block := f.read(chunk_size):
                    hasher.update(block)
                    low, high = max(start - position, 0), min(end - position, len(block))
                    position += len(block)
                    if low < high:
                        if held is not None:
                            yield held
                        held = block[low:high]
        except OSError as e:
            raise StorageFailure("the stored image could not be read") from e
        if hasher.digest() != sha256:
            raise DataLoss(f"the stored image with SHA-256 {sha256.hex()} is corrupted")
        if held is not None:
            yield held

    def sweep_temporary_files(self, older_than: float = 3600.0) -> int:
        """Remove temporary files left by interrupted ``put`` calls, older than ``older_than`` seconds.

        The age keeps the files of ``put`` calls still running (in this or another process). Returns how
        many were removed.
        """
        removed = 0
        limit = time.time() - older_than
        for temporary in self._root.glob(f"sha256/*/{_TEMPORARY_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if temporary.stat().st_mtime <= limit:
                    temporary.unlink()
                    removed += 1
        return removed
