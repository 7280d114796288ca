"""ESP app images as build servers upload them, parsed and checked before anything is signed.

An ESP-IDF app image (``esp_image_header_t`` and friends in ESP-IDF ``esp_app_format.h``); integers are
little-endian. Offsets are from the start of the file.

Image header, 24 bytes:

======  ====  ==================================================================
offset  size  field
======  ====  ==================================================================
0       1     magic ``0xE9``
1       1     segment_count, 1..16
2       1     spi_mode (0 QIO, 1 QOUT, 2 DIO, 3 DOUT)
3       1     spi_speed (low nibble) and spi_size (high nibble)
4       4     entry_addr
8       1     wp_pin
9       3     spi_pin_drv
12      2     chip_id (see ``kms.domain.chips``)
14      1     min_chip_rev (legacy, major revision only)
15      2     min_chip_rev_full (major * 100 + minor)
17      2     max_chip_rev_full
19      4     reserved
23      1     hash_appended, 0 or 1
======  ====  ==================================================================

Then ``segment_count`` segments, each an 8-byte header ``load_addr u32, data_len u32`` followed by
``data_len`` bytes (a multiple of 4: the bootloader refuses anything else).

Footer: zero padding until the file length is ≡ 15 (mod 16), one checksum byte (``0xEF`` XOR every byte of
segment data), then, if hash_appended, the SHA-256 of everything before it (32 bytes). Nothing follows; a
Secure Boot V2 signature sector is added only when the image is signed (``kms.domain.sbv2``).

The first segment's data (file offset 0x20) starts with the 256-byte ``esp_app_desc_t``:

======  ====  ============================================
offset  size  field (offsets within the descriptor)
======  ====  ============================================
0       4     magic ``0xABCD5432``
4       4     secure_version (anti-rollback counter)
8       8     reserved
16      32    version, NUL-terminated
48      32    project_name
80      16    time
96      16    date
112     32    idf_ver
144     32    app_elf_sha256
176     2     min_efuse_blk_rev_full
178     2     max_efuse_blk_rev_full
180     1     mmu_page_size (log2), 0 if unset
181     75    reserved
======  ====  ============================================
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from kms.domain.chips import Chip, chip_by_id
from kms.domain.errors import InvalidImage, LimitExceeded

IMAGE_MAGIC = 0xE9
HEADER_SIZE = 24
SEGMENT_HEADER_SIZE = 8
MAX_SEGMENTS = 16
CHECKSUM_SEED = 0xEF
SHA256_SIZE = 32
APP_DESC_MAGIC = 0xABCD5432
APP_DESC_OFFSET = HEADER_SIZE + SEGMENT_HEADER_SIZE  # 0x20
APP_DESC_SIZE = 256

_HEADER = struct.Struct("<BBBBIB3sHBHH4sB")
_SEGMENT_HEADER = struct.Struct("<II")
_APP_DESC = struct.Struct("<II8s32s32s16s16s32s32sHHB3s72s")
_SBV2_SECTOR_SIZE = 4096
_SBV2_BLOCK_MAGIC = 0xE7
_XOR_CHUNK = 1 << 14


@dataclass(frozen=True)
class Segment:
    """One segment: where it loads, where its data sits in the file, and how long it is."""

    load_addr: int
    data_offset: int
    length: int

    @property
    def header_offset(self) -> int:
        """File offset of the segment's 8-byte header (esptool's "File offs")."""
        return self.data_offset - SEGMENT_HEADER_SIZE


@dataclass(frozen=True)
class AppImage:
    """A parsed, checked app image. Strings of the app descriptor are decoded UTF-8 without NULs."""

    size: int
    chip: Chip
    entry_addr: int
    spi_mode: int
    spi_speed: int
    spi_size: int
    wp_pin: int
    spi_pin_drv: bytes
    min_chip_rev: int
    min_chip_rev_full: int
    max_chip_rev_full: int
    hash_appended: bool
    segments: tuple[Segment, ...]
    checksum: int
    appended_sha256: bytes | None
    secure_version: int
    version: str
    project_name: str
    time: str
    date: str
    idf_ver: str
    app_elf_sha256: bytes = field(repr=False)
    min_efuse_blk_rev_full: int
    max_efuse_blk_rev_full: int
    mmu_page_size: int

    @property
    def segment_count(self) -> int:
        return len(self.segments)


def parse_app_image(data: bytes, max_size: int) -> AppImage:
    """Parse and check an unsigned app image.

    Raises ``LimitExceeded`` if ``data`` is longer than ``max_size`` and ``InvalidImage``, naming the
    problem and its file offset, if it is not a well-formed app image: too short, bad magic, a segment
    count of 0 or more than 16, an unknown chip, a segment running past the end or of unaligned length, a
    bad checksum or appended SHA-256, bytes after the footer, or no app descriptor.
    """
    if len(data) > max_size:
        raise LimitExceeded(f"image is {len(data)} bytes; the limit is {max_size} bytes")
    view = memoryview(data)
    header = _read_header(view)
    segments = _read_segments(view, header.segment_count)
    checksum, appended_sha256 = _check_footer(view, segments, header.hash_appended)
    desc = _read_app_descriptor(view, segments[0])
    return AppImage(
        size=len(view),
        chip=header.chip,
        entry_addr=header.entry_addr,
        spi_mode=header.spi_mode,
        spi_speed=header.spi_speed_size & 0x0F,
        spi_size=header.spi_speed_size >> 4,
        wp_pin=header.wp_pin,
        spi_pin_drv=header.spi_pin_drv,
        min_chip_rev=header.min_chip_rev,
        min_chip_rev_full=header.min_chip_rev_full,
        max_chip_rev_full=header.max_chip_rev_full,
        hash_appended=header.hash_appended,
        segments=segments,
        checksum=checksum,
        appended_sha256=appended_sha256,
        secure_version=desc.secure_version,
        version=desc.version,
        project_name=desc.project_name,
        time=desc.time,
        date=desc.date,
        idf_ver=desc.idf_ver,
        app_elf_sha256=desc.app_elf_sha256,
        min_efuse_blk_rev_full=desc.min_efuse_blk_rev_full,
        max_efuse_blk_rev_full=desc.max_efuse_blk_rev_full,
        mmu_page_size=desc.mmu_page_size,
    )


def xor_bytes(data: memoryview) -> int:
    """XOR of all bytes of ``data``, at C speed: XOR ``_XOR_CHUNK``-byte integers, then fold the result."""
    accumulator = 0
    for start in range(0, len(data), _XOR_CHUNK):
        accumulator ^= int.from_bytes(data[start : start + _XOR_CHUNK], "little")
    width = _XOR_CHUNK
    while width > 1:
        width //= 2
        accumulator = (accumulator >> (8 * width)) ^ (accumulator & ((1 << (8 * width)) - 1))
    return accumulator


class _Header(NamedTuple):
    segment_count: int
    spi_mode: int
    spi_speed_size: int
    entry_addr: int
    wp_pin: int
    spi_pin_drv: bytes
    chip: Chip
    min_chip_rev: int
    min_chip_rev_full: int
    max_chip_rev_full: int
    hash_appended: bool


def _read_header(view: memoryview) -> _Header:
    if len(view) < HEADER_SIZE:
        raise InvalidImage(f"image is {len(view)} bytes, shorter than the {HEADER_SIZE}-byte image header")
    (
        magic,
        segment_count,
        spi_mode,
        spi_speed_size,
        entry_addr,
        wp_pin,
        spi_pin_drv,
        chip_id,
        min_chip_rev,
        min_chip_rev_full,
        max_chip_rev_full,
        _reserved,
        hash_appended,
    ) = _HEADER.unpack_from(view)
    if magic != IMAGE_MAGIC:
        raise InvalidImage(
            f"bad image magic {magic:#04x} at offset 0, expected {IMAGE_MAGIC:#04x}: not an ESP app image"
        )
    if not 1 <= segment_count <= MAX_SEGMENTS:
        raise InvalidImage(f"segment count {segment_count} at offset 1 is not between 1 and {MAX_SEGMENTS}")
    try:
        chip = chip_by_id(chip_id)
    except InvalidImage as e:
        raise InvalidImage(f"image header at offset 12: {e}") from None
    if hash_appended not in (0, 1):
        raise InvalidImage(f"hash_appended flag at offset 23 is {hash_appended:#04x}, expected 0 or 1")
    return _Header(
        segment_count,
        spi_mode,
        spi_speed_size,
        entry_addr,
        wp_pin,
        spi_pin_drv,
        chip,
        min_chip_rev,
        min_chip_rev_full,
        max_chip_rev_full,
        hash_appended == 1,
    )


def _read_segments(view: memoryview, segment_count: int) -> tuple[Segment, ...]:
    size = len(view)
    segments = []
    position = HEADER_SIZE
    for index in range(segment_count):
        if position + SEGMENT_HEADER_SIZE > size:
            raise InvalidImage(
                f"image ends at offset {size:#x} inside the header of segment {index} "
                f"at offset {position:#x} ({segment_count} segments declared)"
            )
        load_addr, length = _SEGMENT_HEADER.unpack_from(view, position)
        data_offset = position + SEGMENT_HEADER_SIZE
        if data_offset + length > size:
            raise InvalidImage(
                f"segment {index} at offset {position:#x} (load address {load_addr:#010x}, {length} bytes) "
                f"runs past the end of the image at offset {size:#x}"
            )
        if length % 4:
            raise InvalidImage(
                f"segment {index} at offset {position:#x} has length {length}, not a multiple of 4 "
                f"(the bootloader refuses it)"
            )
        segments.append(Segment(load_addr, data_offset, length))
        position = data_offset + length
    return tuple(segments)


def _check_footer(
    view: memoryview, segments: tuple[Segment, ...], hash_appended: bool
) -> tuple[int, bytes | None]:
    """Check the checksum, the appended SHA-256 and that nothing follows; return checksum and SHA-256."""
    size = len(view)
    checksum_offset = (segments[-1].data_offset + segments[-1].length) | 0x0F
    if checksum_offset >= size:
        raise InvalidImage(
            f"image ends at offset {size:#x} before its checksum byte at offset {checksum_offset:#x}"
        )
    stored_checksum = view[checksum_offset]
    computed_checksum = _checksum(view, segments)
    if stored_checksum != computed_checksum:
        raise InvalidImage(
            f"bad checksum at offset {checksum_offset:#x}: expected {computed_checksum:#04x} "
            f"(computed from the segment data), found {stored_checksum:#04x}"
        )
    end = checksum_offset + 1
    appended_sha256 = None
    if hash_appended:
        if end + SHA256_SIZE > size:
            raise InvalidImage(
                f"image ends at offset {size:#x} inside the appended SHA-256 at offset {end:#x} "
                "(hash_appended is set)"
            )
        appended_sha256 = bytes(view[end : end + SHA256_SIZE])
        computed_sha256 = hashlib.sha256(view[:end]).digest()
        if appended_sha256 != computed_sha256:
            raise InvalidImage(
                f"bad appended SHA-256 at offset {end:#x}: expected {computed_sha256.hex()}, "
                f"found {appended_sha256.hex()}"
            )
        end += SHA256_SIZE
    if end != size:
        raise InvalidImage(_trailing_bytes_message(view, end))
    return stored_checksum, appended_sha256


def _checksum(view: memoryview, segments: tuple[Segment, ...]) -> int:
    checksum = CHECKSUM_SEED
    for segment in segments:
        checksum ^= xor_bytes(view[segment.data_offset : segment.data_offset + segment.length])
    return checksum


class _AppDescriptor(NamedTuple):
    secure_version: int
    version: str
    project_name: str
    time: str
    date: str
    idf_ver: str
    app_elf_sha256: bytes
    min_efuse_blk_rev_full: int
    max_efuse_blk_rev_full: int
    mmu_page_size: int


def _read_app_descriptor(view: memoryview, first: Segment) -> _AppDescriptor:
    if first.length < APP_DESC_SIZE:
        raise InvalidImage(
            f"segment 0 holds {first.length} bytes, too few for the {APP_DESC_SIZE}-byte app descriptor at "
            f"offset {APP_DESC_OFFSET:#x}: not an ESP-IDF app image"
        )
    fields = _APP_DESC.unpack_from(view, APP_DESC_OFFSET)
    magic, secure_version, _, version, project_name, time, date, idf_ver, elf_sha256 = fields[:9]
    min_efuse_blk_rev_full, max_efuse_blk_rev_full, mmu_page_size = fields[9:12]
    if magic != APP_DESC_MAGIC:
        raise InvalidImage(
            f"no app descriptor at offset {APP_DESC_OFFSET:#x}: magic is {magic:#010x}, expected "
            f"{APP_DESC_MAGIC:#010x} (is this a bootloader or a non-ESP-IDF image?)"
        )
    return _AppDescriptor(
        secure_version=secure_version,
        version=_c_string(version, "version", APP_DESC_OFFSET + 16),
        project_name=_c_string(project_name, "project_name", APP_DESC_OFFSET + 48),
        time=_c_string(time, "time", APP_DESC_OFFSET + 80),
        date=_c_string(date, "date", APP_DESC_OFFSET + 96),
        idf_ver=_c_string(idf_ver, "idf_ver", APP_DESC_OFFSET + 112),
        app_elf_sha256=elf_sha256,
        min_efuse_blk_rev_full=min_efuse_blk_rev_full,
        max_efuse_blk_rev_full=max_efuse_blk_rev_full,
        mmu_page_size=mmu_page_size,
    )


def _c_string(raw: bytes, name: str, offset: int) -> str:
    text = raw.split(b"\0", 1)[0]
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidImage(f"app descriptor {name} at offset {offset:#x} is not UTF-8 text") from None


def _trailing_bytes_message(view: memoryview, end: int) -> str:
    size = len(view)
    extra = size - end
    sector = size - _SBV2_SECTOR_SIZE
    if size % _SBV2_SECTOR_SIZE == 0 and sector >= end and view[sector] == _SBV2_BLOCK_MAGIC:
        return (
            f"{extra} bytes follow the image footer at offset {end:#x}, and offset {sector:#x} holds a "
            "Secure Boot V2 signature block: this image is already signed; upload the unsigned build output"
        )
    if bytes(view[end:]).count(0xFF) == extra:
        return (
            f"{extra} bytes of 0xFF padding follow the image footer at offset {end:#x}: "
            "upload the image as built, unpadded"
        )
    return (
        f"{extra} unexpected bytes after the image footer at offset {end:#x}: is this image already signed?"
    )
