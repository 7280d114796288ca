"""Valid ESP app images for tests and benchmarks, built from scratch and deterministic from a seed.

The images are what ESP-IDF's build emits, reduced to what the format requires: an image header, a first
flash-mapped (DROM) segment starting with an ``esp_app_desc_t``, further IROM/DRAM/IRAM segments of random
bytes, the checksum and the appended SHA-256. ``esptool image-info`` accepts them. Flash-mapped segments load
at ``region base + file offset``, so their file offset and load address agree modulo the 64 KiB MMU page, as
the bootloader requires.

This module is written independently of ``kms.domain.esp_image`` (no shared helpers), so that a parser bug
cannot hide behind the same bug in the builder.
"""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass

_CHIP_IDS = {
    "esp32": 0x0000,
    "esp32s2": 0x0002,
    "esp32c3": 0x0005,
    "esp32s3": 0x0009,
    "esp32c2": 0x000C,
    "esp32c6": 0x000D,
    "esp32h2": 0x0010,
    "esp32p4": 0x0012,
    "esp32c61": 0x0014,
    "esp32c5": 0x0017,
}


@dataclass(frozen=True)
class _MemoryMap:
    drom: int  # base of the flash-mapped data region
    irom: int  # base of the flash-mapped code region
    dram: int
    iram: int


# Addresses from each chip's memory map (ESP-IDF linker scripts / esptool's MEMORY_MAP).
_MEMORY_MAPS = {
    "esp32": _MemoryMap(drom=0x3F400000, irom=0x400D0000, dram=0x3FFB0000, iram=0x40080000),
    "esp32s2": _MemoryMap(drom=0x3F000000, irom=0x40080000, dram=0x3FFB0000, iram=0x40020000),
    "esp32s3": _MemoryMap(drom=0x3C000000, irom=0x42000000, dram=0x3FC88000, iram=0x40374000),
    "esp32c3": _MemoryMap(drom=0x3C000000, irom=0x42000000, dram=0x3FC80000, iram=0x40380000),
    "esp32c2": _MemoryMap(drom=0x3C000000, irom=0x42000000, dram=0x3FCA0000, iram=0x40380000),
    "esp32c6": _MemoryMap(drom=0x42800000, irom=0x42000000, dram=0x40810000, iram=0x40800000),
    "esp32h2": _MemoryMap(drom=0x42800000, irom=0x42000000, dram=0x40810000, iram=0x40800000),
    "esp32p4": _MemoryMap(drom=0x40000000, irom=0x40000000, dram=0x4FF20000, iram=0x4FF00000),
    "esp32c61": _MemoryMap(drom=0x42000000, irom=0x42000000, dram=0x40810000, iram=0x40800000),
    "esp32c5": _MemoryMap(drom=0x42000000, irom=0x42000000, dram=0x40810000, iram=0x40800000),
}
_FLASH_SPAN = 0x300000  # flash-mapped load addresses wrap within 3 MiB of their region base
_RAM_SEGMENT_MAX = 16 * 1024
_HEADER_SIZE = 24
_SEGMENT_HEADER_SIZE = 8
_APP_DESC_SIZE = 256
SUPPORTED_CHIPS = tuple(_CHIP_IDS)


@dataclass(frozen=True)
class AppDescriptorFields:
    """What ``build_app_image`` writes into ``esp_app_desc_t``; tests compare parsers against it."""

    secure_version: int
    version: str
    project_name: str
    time: str
    date: str
    idf_ver: str
    app_elf_sha256: bytes


def build_app_image(
    chip: str,
    size: int,
    secure_version: int = 0,
    version: str = "1.0.0",
    project_name: str = "demo",
    segments: int = 4,
    hash_appended: bool = True,
    seed: int = 0,
    *,
    idf_ver: str = "v5.3.1",
    entry_addr: int | None = None,
    min_chip_rev_full: int = 0,
    max_chip_rev_full: int = 199,
) -> bytes:
    """A valid app image for ``chip`` (esptool name) of exactly ``size`` bytes rounded up to 16.

    ``segments`` (1 to 16) counts segments: a DROM segment holding the app descriptor, then IROM, DRAM and
    IRAM segments in turn. Segment contents are random bytes from ``seed``; the same arguments always give
    the same bytes.
    """
    memory = _MEMORY_MAPS[chip]
    if not 1 <= segments <= 16:
        raise ValueError("an image holds 1 to 16 segments")
    total = -(-size // 16) * 16
    checksum_offset = total - (32 if hash_appended else 0) - 1
    data_end = checksum_offset - 3  # 3 zero bytes of padding put the checksum at offset ≡ 15 (mod 16)
    lengths = _segment_lengths(data_end - _HEADER_SIZE - segments * _SEGMENT_HEADER_SIZE, segments)
    rng = random.Random(seed)
    desc = app_descriptor(seed, secure_version, version, project_name, idf_ver)

    out = bytearray(_header(chip, segments, entry_addr, min_chip_rev_full, max_chip_rev_full, hash_appended))
    kinds = ["irom", "dram", "iram"]
    for index, length in enumerate(lengths):
        kind = "drom" if index == 0 else kinds[(index - 1) % 3]
        data_offset = len(out) + _SEGMENT_HEADER_SIZE
        base = getattr(memory, kind)
        load_addr = base + data_offset % _FLASH_SPAN if kind in ("drom", "irom") else base
        data = rng.randbytes(length)
        if index == 0:
            data = desc + data[len(desc) :]
        out += struct.pack("<II", load_addr, length) + data
    out += bytes(3)
    out.append(_checksum(bytes(out), lengths))
    if hash_appended:
        out += hashlib.sha256(out).digest()
    assert len(out) == total
    return bytes(out)


def app_descriptor(
    seed: int = 0,
    secure_version: int = 0,
    version: str = "1.0.0",
    project_name: str = "demo",
    idf_ver: str = "v5.3.1",
) -> bytes:
    """A 256-byte ``esp_app_desc_t`` as ``build_app_image`` writes it."""
    fields = expected_app_descriptor(seed, secure_version, version, project_name, idf_ver)
    return struct.pack(
        "<II8s32s32s16s16s32s32sHHB3s72s",
        0xABCD5432,
        fields.secure_version,
        b"",
        fields.version.encode(),
        fields.project_name.encode(),
        fields.time.encode(),
        fields.date.encode(),
        fields.idf_ver.encode(),
        fields.app_elf_sha256,
        0,  # min_efuse_blk_rev_full
        99,  # max_efuse_blk_rev_full
        16,  # mmu_page_size: log2(64 KiB)
        b"",
        b"",
    )


def expected_app_descriptor(
    seed: int = 0,
    secure_version: int = 0,
    version: str = "1.0.0",
    project_name: str = "demo",
    idf_ver: str = "v5.3.1",
) -> AppDescriptorFields:
    """The descriptor fields an image built with these arguments carries."""
    return AppDescriptorFields(
        secure_version=secure_version,
        version=version,
        project_name=project_name,
        time="12:34:56",
        date="Jan  2 2025",
        idf_ver=idf_ver,
        app_elf_sha256=hashlib.sha256(b"elf %d" % seed).digest(),
    )


def refresh_footer(image: bytes | bytearray) -> bytes:
    """``image`` with its checksum and appended SHA-256 recomputed (after a test edited it).

    Walks the segments as the header declares them; the image must still be structurally sound.
    """
    out = bytearray(image)
    count, hash_appended = out[1], out[23]
    position = _HEADER_SIZE
    lengths = []
    for _ in range(count):
        (length,) = struct.unpack_from("<I", out, position + 4)
        lengths.append(length)
        position += _SEGMENT_HEADER_SIZE + length
        if position > len(out):
            raise ValueError("the declared segments run past the end of the image")
    checksum_offset = position + (15 - position % 16)
    out[checksum_offset] = _checksum(bytes(out[:checksum_offset]), lengths)
    if hash_appended:
        end = checksum_offset + 1
        out[end : end + 32] = hashlib.sha256(out[:end]).digest()
    return bytes(out)


def _header(
    chip: str,
    segments: int,
    entry_addr: int | None,
    min_chip_rev_full: int,
    max_chip_rev_full: int,
    hash_appended: bool,
) -> bytes:
    memory = _MEMORY_MAPS[chip]
    entry = memory.iram + 0x1C if entry_addr is None else entry_addr
    return struct.pack(
        "<BBBBIB3sHBHH4sB",
        0xE9,
        segments,
        2,  # DIO
        0x20,  # 4 MB, speed 0
        entry,
        0xEE,  # WP pin disabled
        b"\0\0\0",
        _CHIP_IDS[chip],
        min_chip_rev_full // 100,
        min_chip_rev_full,
        max_chip_rev_full,
        b"",
        1 if hash_appended else 0,
    )


def _segment_lengths(data_bytes: int, count: int) -> list[int]:
    """Split ``data_bytes`` (a multiple of 4) over ``count`` segments: small RAM ones, large flash ones."""
    minimum = _APP_DESC_SIZE + 4 * (count - 1)
    if data_bytes < minimum:
        raise ValueError(f"image too small for {count} segments")
    ram = [i for i in range(1, count) if (i - 1) % 3 != 0]
    ram_length = min(_RAM_SEGMENT_MAX, (data_bytes // (4 * count)) * 4)
    lengths = [ram_length if i in ram else 0 for i in range(count)]
    flash = [i for i in range(count) if i not in ram]
    remaining = data_bytes - sum(lengths)
    share = (remaining // (4 * len(flash))) * 4
    for i in flash:
        lengths[i] = share
    lengths[0] += remaining - share * len(flash)
    if lengths[0] < _APP_DESC_SIZE or min(lengths) < 4:
        lengths = [4] * count
        lengths[0] = data_bytes - 4 * (count - 1)
    return lengths


def _checksum(image: bytes, lengths: list[int]) -> int:
    """0xEF XOR every segment data byte; big-integer folding keeps it fast on multi-MiB images."""
    checksum = 0xEF
    position = _HEADER_SIZE
    for length in lengths:
        start = position + _SEGMENT_HEADER_SIZE
        data = image[start : start + length]
        value = int.from_bytes(data, "big")
        width = len(data)
        while width > 1:
            high = width // 2
            low = width - high
            value = (value >> (8 * low)) ^ (value & ((1 << (8 * low)) - 1))
            width = low
        checksum ^= value
        position = start + length
    return checksum
