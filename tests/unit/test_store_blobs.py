"""BlobStore: layout, idempotency, verified ranged reads, corruption, and atomicity under SIGKILL."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.domain.errors import DataLoss, InvalidArgument, NotFound
from kms.store.blobs import BlobStore


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "sha256").glob("*/*") if not p.name.startswith(".tmp-"))


def temporary_files(root: Path) -> list[Path]:
    return sorted((root / "sha256").glob("*/.tmp-*"))


def corrupt(path: Path, position: int = 0) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_put_stores_under_the_content_hash(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "releases")
    data = os.urandom(100_000)
    digest = store.put(data)
    assert digest == hashlib.sha256(data).digest()
    hex_digest = digest.hex()
    path = tmp_path / "releases" / "sha256" / hex_digest[:2] / hex_digest[2:]
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o444
    assert store.exists(digest)
    assert store.read(digest) == data


def test_put_is_idempotent_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"signed image"
    assert store.put(data) == store.put(data)
    assert len(stored_files(tmp_path)) == 1
    assert temporary_files(tmp_path) == []


def test_concurrent_puts_of_the_same_content(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(1 << 20)
    barrier = threading.Barrier(8)

    def put() -> None:
        barrier.wait()
        store.put(data)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stored_files(tmp_path)) == 1
    assert store.read(hashlib.sha256(data).digest()) == data
    assert temporary_files(tmp_path) == []


def test_the_empty_image(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    assert store.read(store.put(b"")) == b""


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=3000),
    offset=st.integers(0, 3000),
    length=st.none() | st.integers(0, 3500),
    chunk_size=st.integers(1, 700),
)
def test_ranged_reads_and_chunks(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, offset: int, length: int | None, chunk_size: int
) -> None:
    store = BlobStore(tmp_path_factory.mktemp("blobs"))
    digest = store.put(data)
    if offset > len(data):
        with pytest.raises(InvalidArgument, match="beyond the end"):
            store.read(digest, offset, length)
        return
    expected = data[offset:] if length is None else data[offset : offset + length]
    assert store.read(digest, offset, length) == expected
    pieces = list(store.chunks(digest, offset, length, chunk_size=chunk_size))
    assert b"".join(pieces) == expected
    assert all(0 < len(p) <= chunk_size for p in pieces)


def test_absent_and_malformed_digests(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(NotFound, match="no stored image has SHA-256 " + "00" * 32):
        store.read(bytes(32))
    with pytest.raises(NotFound):
        store.chunks(bytes(32))  # raised before iteration starts
    with pytest.raises(InvalidArgument, match="32 bytes"):
        store.read(b"short")
    with pytest.raises(InvalidArgument, match="negative"):
        store.read(store.put(b"x"), -1)


@pytest.mark.parametrize(("offset", "length"), [(0, None), (10, None), (0, 10), (100_000, 5)])
def test_a_corrupted_file_is_data_loss_for_every_read(
    tmp_path: Path, offset: int, length: int | None
) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(200_000)
    digest = store.put(data)
    corrupt(stored_files(tmp_path)[0], position=150_000)  # outside the (0, 10) range: still detected
    with pytest.raises(DataLoss, match="corrupted"):
        store.read(digest, offset, length)


def test_a_stream_of_a_corrupted_file_never_delivers_the_whole_image(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(10 * 1024)
    digest = store.put(data)
    corrupt(stored_files(tmp_path)[0], position=len(data) - 1)
    received = bytearray()
    with pytest.raises(DataLoss):
        for piece in store.chunks(digest, chunk_size=1024):
            received += piece
    assert bytes(received) == data[: 9 * 1024]  # the last piece is held back until the hash matched


def test_put_repairs_a_corrupted_copy(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = os.urandom(5000)
    digest = store.put(data)
    corrupt(stored_files(tmp_path)[0])
    assert store.put(data) == digest
    assert store.read(digest) == data


def test_sweep_removes_only_old_temporary_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.put(b"a")
    directory = stored_files(tmp_path)[0].parent
    old, young = directory / ".tmp-old", directory / ".tmp-young"
    old.write_bytes(b"partial")
    young.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.sweep_temporary_files(older_than=3600) == 1
    assert temporary_files(tmp_path) == [young]


# A child that stops inside put(), between writing the temporary file and renaming it: os.fsync of a file
# announces itself on stdout and then sleeps until the parent kills the child with SIGKILL.
_STOPS_IN_PUT = """
import os, random, stat, sys, time
from kms.store.blobs import BlobStore

real_fsync = os.fsync

def stuck_fsync(fd):
    if stat.S_ISREG(os.fstat(fd).st_mode):
        print("in-fsync", flush=True)
        time.sleep(60)
    real_fsync(fd)

os.fsync = stuck_fsync
BlobStore(sys.argv[1]).put(random.Random(sys.argv[2]).randbytes(256 * 1024))
"""


def test_sigkill_during_put_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    data = random.Random("seed").randbytes(256 * 1024)
    child = subprocess.Popen(
        [sys.executable, "-c", _STOPS_IN_PUT, str(tmp_path), "seed"], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "in-fsync\n"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)

    store = BlobStore(tmp_path)
    digest = hashlib.sha256(data).digest()
    assert stored_files(tmp_path) == []
    assert not store.exists(digest)
    with pytest.raises(NotFound):
        store.read(digest)
    assert len(temporary_files(tmp_path)) == 1  # the interrupted write, never visible under its name
    assert store.sweep_temporary_files(older_than=0) == 1
    assert store.put(data) == digest
    assert store.read(digest) == data


# A child that stores random blobs in a loop and prints each digest once put() returned.
_PUTS_FOREVER = """
import os, sys
from kms.store.blobs import BlobStore

store = BlobStore(sys.argv[1])
while True:
    print(store.put(os.urandom(int(sys.argv[2]))).hex(), flush=True)
"""


def test_sigkill_at_a_random_moment_leaves_only_complete_files(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _PUTS_FOREVER, str(tmp_path), str(512 * 1024)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acknowledged = [child.stdout.readline().strip() for _ in range(20)]
    time.sleep(0.013)  # land somewhere inside a later put()
    child.send_signal(signal.SIGKILL)
    acknowledged += [line.strip() for line in child.stdout]
    child.wait(timeout=10)

    store = BlobStore(tmp_path)
    for digest in acknowledged:
        assert store.exists(bytes.fromhex(digest))
    for path in stored_files(tmp_path):  # every file under a final name is complete and correct
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.parent.name + path.name
