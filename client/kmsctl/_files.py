"""Local files: the image to upload, and outputs written atomically.

An output file is written to a temporary file beside it (same directory, so the rename cannot cross file
systems), flushed and fsync'd, then renamed over the target. A reader therefore sees the old file or the
complete new one, never a partial one, and a failed call leaves no file behind.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

ImageInput = bytes | str | os.PathLike[str] | BinaryIO

_READ_SIZE = 1 << 20


class AtomicFile:
    """A binary file that replaces ``target`` only on ``commit()``; ``discard()`` removes every trace.

    Used as a context manager it commits on a clean exit and discards on an exception. The new file gets
    the permissions an ordinary ``open(target, "wb")`` would give it (0666 less the umask).
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self._temp = self.target.with_name(f".{self.target.name}.{secrets.token_hex(6)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # O_BINARY: Windows
        descriptor = os.open(self._temp, flags, 0o666)
        self._file = os.fdopen(descriptor, "wb")

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def commit(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._temp.replace(self.target)
        except BaseException:
            self.discard()
            raise
        fsync_directory(self.target.parent)

    def discard(self) -> None:
        self._file.close()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(target: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``target`` with ``data`` atomically."""
    with AtomicFile(target) as output:
        output.write(data)


def fsync_directory(directory: Path) -> None:
    """Make a rename durable. Not every platform can open a directory (Windows cannot); skip there."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class ImageSource:
    """An image to upload, readable once to hash it and then again for every upload attempt.

    Bytes are used as they are; a path is re-read for each attempt, so a large image is never held in
    memory; a seekable stream is read from its current position and rewound; any other stream is read into
    memory once. If a file changes between hashing and upload, the server refuses the upload (DATA_LOSS).
    """

    def __init__(self, image: ImageInput) -> None:
        self._data: bytes | None = None
        self._path: Path | None = None
        self._stream: BinaryIO | None = None
        self._start = 0
        if isinstance(image, bytes):
            self._data = image
        elif isinstance(image, str | os.PathLike):
            self._path = Path(image)
        elif image.seekable():
            self._stream = image
            self._start = image.tell()
        else:
            self._data = image.read()
        self.size, self.sha256 = self._measure()

    def _measure(self) -> tuple[int, bytes]:
        hasher = hashlib.sha256()
        size = 0
        for block in self.chunks(_READ_SIZE):
            hasher.update(block)
            size += len(block)
        return size, hasher.digest()

    def chunks(self, size: int) -> Iterator[bytes]:
        """The image from its first byte, in pieces of ``size`` bytes (the last one may be shorter)."""
        if self._data is not None:
            for offset in range(0, len(self._data), size):
                yield self._data[offset : offset + size]
        elif self._path is not None:
            with self._path.open("rb") as file:
                yield from _read_blocks(file, size)
        else:
            assert self._stream is not None
            self._stream.seek(self._start)
            yield from _read_blocks(self._stream, size)


def _read_blocks(file: BinaryIO, size: int) -> Iterator[bytes]:
    while block := file.read(size):
        yield block
