"""Payload downloads: the GetPayload stream, resumed at the byte where it broke, into memory or a ``.part``
file.

Payloads are deterministic (the same device, release, format and segment size always give the same bytes,
from any server process), so a broken stream is resumed by asking again from ``offset`` = bytes received.
Every attempt's ``PayloadInfo`` must match the first one, the stream must carry exactly the announced bytes,
and the start of the finished payload is checked against what the client asked for: the FKSP header and
manifest (layout, sizes, device id, and the image SHA-256 the release is named after) or the
esp_encrypted_img header (magic, size). None of this authenticates the payload; the device does that.

A download to a file goes to ``OUT.part`` and is renamed to ``OUT`` once complete and checked. With
``resume``, an existing ``OUT.part`` (from an interrupted run) is continued: its last bytes (up to 4 KiB) are
fetched again and compared first, so a ``.part`` left by a different download is detected and the download
starts over from zero instead of producing a corrupt file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc

from kmsapi.v1 import devices_pb2
from kmsctl import _wire
from kmsctl._files import fsync_directory
from kmsctl._models import PayloadFormat, PayloadInfo, ProgressCallback
from kmsctl._streams import IdleWatchdog, ResumeBudget
from kmsctl.errors import DeadlineExceededError, IntegrityError, UnavailableError

#: How much of an existing ``.part`` file is downloaded again and compared before it is continued.
RESUME_OVERLAP = 4096
MIN_SEGMENT_SIZE = 256
MAX_SEGMENT_SIZE = 1 << 20

_FKSP_PREFIX = 64 + 256 + 64  # header, manifest, signature
_ESP_HEADER = 512
_ESP_MAGIC = 0x0788B6CF
_RELEASE_PREFIX = "releases/"

if TYPE_CHECKING:
    _Rpc = grpc.UnaryStreamMultiCallable[devices_pb2.GetPayloadRequest, devices_pb2.GetPayloadResponse]


class _StaleResume(Exception):
    """The ``.part`` being continued does not match the payload the server streams."""


class Sink(Protocol):
    """Where payload bytes go: they cover ``[start, end)`` of the payload."""

    start: int
    #: True while the bytes held come from an earlier run (a ``.part`` being continued, not yet confirmed).
    may_be_stale: bool

    @property
    def end(self) -> int: ...

    def request_offset(self) -> int:
        """Where the next attempt asks the server to start (at most ``end``)."""
        ...

    def accept(self, position: int, data: bytes) -> None:
        """Take payload bytes ``[position, position + len(data))``; ``position`` is at most ``end``."""
        ...

    def head(self, size: int) -> bytes | None:
        """The payload's first ``size`` bytes, if this sink has them."""
        ...

    def restart(self) -> None:
        """Forget everything and start again from byte 0 (a stale ``.part``)."""
        ...


class MemorySink:
    """Payload bytes ``[start, total)`` in memory."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.may_be_stale = False
        self._data = bytearray()

    @property
    def end(self) -> int:
        return self.start + len(self._data)

    def request_offset(self) -> int:
        return self.end

    def accept(self, position: int, data: bytes) -> None:
        if position != self.end:
            raise IntegrityError(f"payload bytes at {position} arrived while expecting byte {self.end}")
        self._data += data

    def head(self, size: int) -> bytes | None:
        return bytes(self._data[:size]) if self.start == 0 else None

    def restart(self) -> None:
        self.start = 0
        self._data.clear()

    def data(self) -> bytes:
        return bytes(self._data)


class PartFile:
    """``OUT.part``: continued when ``resume`` and it exists (after checking its tail), else created empty.
    ``commit()`` renames it to ``OUT``; ``close()`` leaves it; ``discard()`` removes it."""

    def __init__(self, output: str | os.PathLike[str], *, resume: bool) -> None:
        self.output = Path(output)
        self.path = self.output.with_name(self.output.name + ".part")
        self.start = 0
        self._tail = b""
        if resume and self.path.is_file():
            self._file = self.path.open("r+b")
            self.start = self._file.seek(0, os.SEEK_END)
            self._file.seek(self.start - min(self.start, RESUME_OVERLAP))
            self._tail = self._file.read()
        else:
            self._file = self.path.open("w+b")
        self._end = self.start
        self.may_be_stale = self.start > 0

    @property
    def end(self) -> int:
        return self._end

    def request_offset(self) -> int:
        return self._end - len(self._tail)

    def accept(self, position: int, data: bytes) -> None:
        tail_start = self._end - len(self._tail)
        if position < self._end:
            if position < tail_start:
                raise IntegrityError(f"payload bytes at {position} arrived while expecting byte {tail_start}")
            compared = min(len(data), self._end - position)
            offset = position - tail_start
            if data[:compared] != self._tail[offset : offset + compared]:
                raise _StaleResume
            data, position = data[compared:], position + compared
            if position == self._end:
                self._tail = b""
                self.may_be_stale = False
        if not data:
            return
        if position != self._end:
            raise IntegrityError(f"payload bytes at {position} arrived while expecting byte {self._end}")
        self._file.write(data)
        self._end += len(data)

    def head(self, size: int) -> bytes | None:
        self._file.flush()
        with self.path.open("rb") as file:
            return file.read(size)

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self.start = self._end = 0
        self._tail = b""
        self.may_be_stale = False

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.path.replace(self.output)
        fsync_directory(self.output.parent)

    def close(self) -> None:
        """Stop writing and keep the ``.part`` for a later resume (unless it is empty)."""
        self._file.close()
        if self.path.stat().st_size == 0:
            self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class Download:
    """Runs one ``get_payload`` call (see the module docstring)."""

    def __init__(
        self,
        rpc: _Rpc,
        request: devices_pb2.GetPayloadRequest,
        expected_format: PayloadFormat,
        sink: Sink,
        *,
        progress: ProgressCallback | None,
        budget: ResumeBudget,
        idle_timeout: float,
    ) -> None:
        self._rpc = rpc
        self._request = request
        self._format = expected_format
        self._sink = sink
        self._progress = progress
        self._budget = budget
        self._idle_timeout = idle_timeout
        self._first: devices_pb2.PayloadInfo | None = None

    def run(self) -> PayloadInfo:
        restarted = False
        while True:
            before = self._sink.end
            try:
                self._attempt(self._sink.request_offset())
                break
            except UnavailableError as error:
                self._budget.failed(error, progressed=self._sink.end > before)
            except _StaleResume:
                if restarted:
                    raise IntegrityError("the payload changed while it was downloaded") from None
                restarted = True
                self._first = None
                self._sink.restart()
        assert self._first is not None
        info = _wire.payload_info(self._first)
        head = self._sink.head(_FKSP_PREFIX if info.format is PayloadFormat.FKSP_V1 else _ESP_HEADER)
        if head is not None:
            check_payload_head(head, info, self._request.device_id, self._request.release)
        return info

    def _attempt(self, offset: int) -> None:
        request = devices_pb2.GetPayloadRequest()
        request.CopyFrom(self._request)
        request.offset = offset
        call = self._rpc(request)
        watchdog = IdleWatchdog(call.cancel, self._idle_timeout)
        position = offset
        total: int | None = None
        try:
            for response in call:
                watchdog.poke()
                part = response.WhichOneof("part")
                if part == "info":
                    if total is not None:
                        raise IntegrityError("the server sent a second payload info in one stream")
                    total = self._check_info(response.info, offset)
                    self._report(position, total)
                elif part == "chunk":
                    if total is None:
                        raise IntegrityError("the server sent payload bytes before the payload info")
                    if position + len(response.chunk) > total:
                        raise IntegrityError(f"the server sent more than the {total} bytes it announced")
                    self._sink.accept(position, response.chunk)
                    position += len(response.chunk)
                    self._report(position, total)
                else:
                    raise IntegrityError("the server sent an empty response message")
            if total is None:
                raise IntegrityError("the server ended the payload stream without a payload info")
            if position < total:
                # A proxy or a server going away can end a stream cleanly; the rest is fetched again.
                raise UnavailableError(f"the payload stream ended after {position} of {total} bytes")
        except grpc.RpcError as error:
            if watchdog.expired:
                raise DeadlineExceededError(
                    f"the server sent nothing for {self._idle_timeout:g} seconds", code="DEADLINE_EXCEEDED"
                ) from error
            translated = _wire.translate(error)
            if translated.code == "OUT_OF_RANGE" and self._sink.may_be_stale:
                raise _StaleResume from error  # the .part is longer than this payload
            raise translated from error
        finally:
            watchdog.stop()
            call.cancel()

    def _check_info(self, info: devices_pb2.PayloadInfo, offset: int) -> int:
        if self._first is not None:
            if info.offset != offset or _identity(info) != _identity(self._first):
                raise IntegrityError("the payload the server announced changed between attempts")
            return info.total_size
        converted = _wire.payload_info(info)
        request = self._request
        if converted.format is not self._format:
            raise IntegrityError(f"asked for {self._format.value}, the server sent {converted.format.value}")
        if info.device_id and info.device_id != request.device_id:
            raise IntegrityError(f"the server sent the payload of device {info.device_id!r}")
        if info.release and info.release != request.release:
            raise IntegrityError(f"the server sent the payload of {info.release}")
        if request.segment_size and info.segment_size != request.segment_size:
            raise IntegrityError(
                f"asked for {request.segment_size}-byte segments, the server sent {info.segment_size}"
            )
        if info.offset != offset:
            raise IntegrityError(
                f"asked for the payload from byte {offset}, the server sent byte {info.offset}"
            )
        if info.total_size < self._sink.end:
            if self._sink.may_be_stale:
                raise _StaleResume  # the .part is longer than this payload
            raise IntegrityError(f"the server announced {info.total_size} bytes, fewer than were received")
        self._first = info
        return info.total_size

    def _report(self, position: int, total: int) -> None:
        if self._progress is not None:
            self._progress(position, total)


def _identity(info: devices_pb2.PayloadInfo) -> tuple[object, ...]:
    return (
        info.format,
        info.total_size,
        info.device_id,
        info.release,
        info.secure_version,
        info.segment_size,
        info.manifest_key_version,
    )


def check_payload_head(head: bytes, info: PayloadInfo, device_id: str, release: str) -> None:
    """Check the first bytes of a payload against its info and the request; raise ``IntegrityError``."""
    if info.format is PayloadFormat.ESP_ENCRYPTED_IMG_ECIES:
        if len(head) < _ESP_HEADER or int.from_bytes(head[:4], "little") != _ESP_MAGIC:
            raise IntegrityError("the payload does not start with an esp_encrypted_img header")
        bin_size = int.from_bytes(head[404:408], "little")
        if _ESP_HEADER + bin_size != info.total_size:
            raise IntegrityError(
                f"the esp_encrypted_img header announces {bin_size} bytes, which does not add up to the "
                f"{info.total_size}-byte payload"
            )
        return
    if len(head) < _FKSP_PREFIX or head[:4] != b"FKSP" or head[4] != 1:
        raise IntegrityError("the payload does not start with an FKSP v1 header")
    header_size = int.from_bytes(head[6:8], "little")
    segment_size = int.from_bytes(head[8:12], "little")
    segments = int.from_bytes(head[12:16], "little")
    image_size = int.from_bytes(head[16:24], "little")
    manifest_size = int.from_bytes(head[24:28], "little")
    signature_size = int.from_bytes(head[28:32], "little")
    if (header_size, manifest_size, signature_size) != (64, 256, 64) or not (
        MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE
    ):
        raise IntegrityError("the payload's FKSP header is malformed")
    if segments != -(-image_size // segment_size) or image_size < 1:
        raise IntegrityError("the payload's FKSP header has an inconsistent segment count")
    if _FKSP_PREFIX + image_size + 16 * segments != info.total_size:
        raise IntegrityError(
            f"the FKSP header describes a {_FKSP_PREFIX + image_size + 16 * segments}-byte payload, "
            f"the server announced {info.total_size}"
        )
    if info.segment_size and info.segment_size != segment_size:
        raise IntegrityError("the FKSP header's segment size differs from the server's payload info")
    manifest = head[64:320]
    if int.from_bytes(manifest[32:40], "little") != image_size:
        raise IntegrityError("the FKSP manifest's image size differs from its header's")
    length = manifest[48]
    if manifest[49 : 49 + length] != device_id.encode("ascii", "replace"):
        raise IntegrityError(
            f"the payload is sealed for device {manifest[49 : 49 + length].decode('ascii', 'replace')!r}, "
            f"not {device_id!r}"
        )
    expected = _release_digest(release)
    if expected is not None and manifest[:32] != expected:
        raise IntegrityError(
            f"the payload carries image {manifest[:32].hex()}, not the image of {release}; it is for "
            "another release"
        )


def _release_digest(release: str) -> bytes | None:
    name = release.removeprefix(_RELEASE_PREFIX)
    if len(name) != 64:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


def release_name(text: str) -> str:
    """``releases/{hex}`` for a release name or its bare hex digest."""
    return text if text.startswith(_RELEASE_PREFIX) else f"{_RELEASE_PREFIX}{text.lower()}"
