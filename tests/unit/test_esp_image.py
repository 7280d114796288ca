"""App image parsing: every field agrees with ``esptool image-info``; every malformation has its message."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import struct
import timeit
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kms.domain.errors import InvalidImage, LimitExceeded
from kms.domain.esp_image import AppImage, parse_app_image, xor_bytes
from tests.support.esp_images import (
    SUPPORTED_CHIPS,
    build_app_image,
    expected_app_descriptor,
    refresh_footer,
)
from tests.support.espressif_tools import run_all

MAX = 8 * 1024 * 1024
MIB = 1024 * 1024


def _edit(image: bytes, offset: int, new: bytes) -> bytes:
    return image[:offset] + new + image[offset + len(new) :]


def _segment_header_offsets(image: bytes) -> list[int]:
    offsets, position = [], 24
    for _ in range(image[1]):
        offsets.append(position)
        position += 8 + struct.unpack_from("<I", image, position + 4)[0]
    return offsets


# --- valid images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("chip", SUPPORTED_CHIPS)
def test_parses_a_built_image(chip: str) -> None:
    data = build_app_image(chip, 20_000, secure_version=7, version="2.1.0-rc1", project_name="door", seed=3)
    image = parse_app_image(data, MAX)
    desc = expected_app_descriptor(3, 7, "2.1.0-rc1", "door")
    assert image.chip.name == chip
    assert image.size == len(data) == 20_000
    assert image.segment_count == 4
    assert (image.secure_version, image.version, image.project_name) == (7, "2.1.0-rc1", "door")
    assert (image.time, image.date, image.idf_ver) == (desc.time, desc.date, desc.idf_ver)
    assert image.app_elf_sha256 == desc.app_elf_sha256
    assert image.hash_appended
    assert image.appended_sha256 == data[-32:] == hashlib.sha256(data[:-32]).digest()
    assert image.checksum == data[-33]
    assert image.segments[0].data_offset == 0x20
    assert sum(s.length + 8 for s in image.segments) + 24 + 3 + 1 + 32 == len(data)


def test_parses_an_image_without_appended_hash() -> None:
    data = build_app_image("esp32s3", 4096, hash_appended=False)
    image = parse_app_image(data, MAX)
    assert not image.hash_appended
    assert image.appended_sha256 is None
    assert image.checksum == data[-1]


@pytest.mark.parametrize("segments", [1, 2, 16])
def test_segment_counts(segments: int) -> None:
    image = parse_app_image(build_app_image("esp32s3", 8192, segments=segments), MAX)
    assert image.segment_count == segments


def test_accepts_an_image_of_exactly_max_size() -> None:
    assert parse_app_image(_unsigned(), 4096).size == 4096


# --- malformed images: exact class, and a message that names the problem and where --------------


@functools.cache
def _unsigned() -> bytes:
    """A valid 4096-byte esp32s3 image with 4 segments; malformed cases damage it."""
    return build_app_image("esp32s3", 4096)


def _signed_looking() -> bytes:
    data = _unsigned()
    padded = data + b"\xff" * (-len(data) % 4096)
    return padded + b"\xe7\x02" + b"\0" * 4094


def _shorten_last_segment(image: bytes, by: int) -> bytes:
    length_at = _segment_header_offsets(image)[-1] + 4
    (length,) = struct.unpack_from("<I", image, length_at)
    return _edit(image, length_at, struct.pack("<I", length - by))


def _first_segment_too_short() -> bytes:
    header = bytearray(_unsigned()[:24])
    header[1] = 1
    body = bytes(header) + struct.pack("<II", 0x3C000020, 16) + b"\x01" * 16
    body += bytes(15 - len(body) % 16) + b"\0" + bytes(32)
    return refresh_footer(body)


MALFORMED: dict[str, tuple[Callable[[], bytes], type[Exception], str]] = {
    "empty": (lambda: b"", InvalidImage, r"image is 0 bytes, shorter than the 24-byte image header"),
    "short": (lambda: _unsigned()[:23], InvalidImage, r"image is 23 bytes, shorter than the 24-byte"),
    "bad magic": (lambda: _edit(_unsigned(), 0, b"\xea"), InvalidImage, r"bad image magic 0xea at offset 0"),
    "zero segments": (lambda: _edit(_unsigned(), 1, b"\0"), InvalidImage, r"segment count 0 at offset 1"),
    "17 segments": (lambda: _edit(_unsigned(), 1, b"\x11"), InvalidImage, r"segment count 17 at offset 1"),
    "unknown chip": (
        lambda: _edit(_unsigned(), 12, b"\x42\x00"),
        InvalidImage,
        r"image header at offset 12: unknown chip id 0x0042 \(supported: esp32 0x0000, .*esp32c5 0x0017\)",
    ),
    "hash flag not 0/1": (
        lambda: _edit(_unsigned(), 23, b"\x02"),
        InvalidImage,
        r"hash_appended flag at offset 23 is 0x02",
    ),
    "cut inside a segment header": (
        lambda: _unsigned()[:28],
        InvalidImage,
        r"image ends at offset 0x1c inside the header of segment 0 at offset 0x18",
    ),
    "segment past the end": (
        lambda: _edit(_unsigned(), 28, struct.pack("<I", 1 << 20)),
        InvalidImage,
        r"segment 0 at offset 0x18 \(load address 0x3c000020, 1048576 bytes\) runs past the end .* 0x1000",
    ),
    "truncated in the data": (
        lambda: _unsigned()[:2000],
        InvalidImage,
        r"segment \d at offset 0x[0-9a-f]+ .* runs past the end of the image at offset 0x7d0",
    ),
    "unaligned segment length": (
        lambda: _shorten_last_segment(_unsigned(), 1),
        InvalidImage,
        r"segment 3 at offset 0x[0-9a-f]+ has length \d+, not a multiple of 4",
    ),
    "no checksum byte": (
        lambda: _unsigned()[:-33],
        InvalidImage,
        r"image ends at offset 0xfdf before its checksum byte at offset 0xfdf",
    ),
    "bad checksum": (
        lambda: _edit(_unsigned(), 4096 - 33, bytes([_unsigned()[-33] ^ 0x5A])),
        InvalidImage,
        r"bad checksum at offset 0xfdf: expected 0x[0-9a-f]{2} \(computed from the segment data\), found 0x",
    ),
    "segment data changed": (
        lambda: _edit(_unsigned(), 0x400, bytes([_unsigned()[0x400] ^ 1])),
        InvalidImage,
        r"bad checksum at offset 0xfdf",
    ),
    "hash cut short": (
        lambda: _unsigned()[:-10],
        InvalidImage,
        r"image ends at offset 0xff6 inside the appended SHA-256 at offset 0xfe0",
    ),
    "bad hash": (
        lambda: _edit(_unsigned(), 4095, bytes([_unsigned()[-1] ^ 1])),
        InvalidImage,
        r"bad appended SHA-256 at offset 0xfe0: expected [0-9a-f]{64}, found [0-9a-f]{64}",
    ),
    "no app descriptor": (
        lambda: refresh_footer(_edit(_unsigned(), 0x20, b"\0\0\0\0")),
        InvalidImage,
        r"no app descriptor at offset 0x20: magic is 0x00000000, expected 0xabcd5432",
    ),
    "first segment too short for the descriptor": (
        _first_segment_too_short,
        InvalidImage,
        r"segment 0 holds 16 bytes, too few for the 256-byte app descriptor at offset 0x20",
    ),
    "version not UTF-8": (
        lambda: refresh_footer(_edit(_unsigned(), 0x30, b"\xff\xfe")),
        InvalidImage,
        r"app descriptor version at offset 0x30 is not UTF-8",
    ),
    "trailing bytes": (
        lambda: _unsigned() + b"\0" * 10,
        InvalidImage,
        r"10 unexpected bytes after the image footer at offset 0x1000: is this image already signed\?",
    ),
    "padded": (
        lambda: _unsigned() + b"\xff" * 100,
        InvalidImage,
        r"100 bytes of 0xFF padding follow the image footer at offset 0x1000: upload the image as built",
    ),
    "already signed": (
        _signed_looking,
        InvalidImage,
        r"4096 bytes follow the image footer at offset 0x1000, .* offset 0x1000 holds a Secure Boot V2 "
        r"signature block: this image is already signed",
    ),
    "too large": (
        lambda: build_app_image("esp32s3", MAX + 16),
        LimitExceeded,
        r"image is 8388624 bytes; the limit is 8388608",
    ),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_image(case: str) -> None:
    make, kind, message = MALFORMED[case]
    data = make()
    with pytest.raises(kind, match=message) as caught:
        parse_app_image(data, MAX)
    assert caught.type is kind


def test_too_large_is_checked_before_anything_else() -> None:
    with pytest.raises(LimitExceeded):
        parse_app_image(b"not an image at all", 10)


# --- speed -------------------------------------------------------------------------------------------


def test_xor_bytes_matches_a_byte_loop() -> None:
    data = build_app_image("esp32", 70_000, seed=9)
    for start, end in [(0, 0), (0, 1), (3, 16_387), (5, 70_000), (100, 32_868)]:
        expected = 0
        for byte in data[start:end]:
            expected ^= byte
        assert xor_bytes(memoryview(data)[start:end]) == expected


def test_checksum_and_parse_are_fast_on_a_large_image(record_property: Callable[[str, object], None]) -> None:
    data = build_app_image("esp32s3", 3 * MIB // 2)
    view = memoryview(data)
    xor_ms = min(timeit.repeat(lambda: xor_bytes(view), number=5, repeat=5)) / 5 * 1000
    parse_ms = min(timeit.repeat(lambda: parse_app_image(data, MAX), number=5, repeat=5)) / 5 * 1000
    record_property("xor_ms_1_5_mib", round(xor_ms, 3))
    record_property("parse_ms_1_5_mib", round(parse_ms, 3))
    print(f"1.5 MiB: checksum {xor_ms:.2f} ms, parse {parse_ms:.2f} ms")
    assert xor_ms < 5
    assert parse_ms < 25


# --- property: arbitrary damage never raises anything but our two errors ------------------------------

_BASES = [build_app_image(chip, 1024, segments=n, seed=n) for chip, n in [("esp32", 1), ("esp32c6", 3)]]


def _mutate(base: bytes, edits: list[tuple[int, int]], cut: int | None, extra: bytes) -> bytes:
    data = bytearray(base)
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    return bytes(data) + extra


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(_BASES),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
    cut=st.none() | st.integers(0, 1 << 16),
    extra=st.binary(max_size=40),
    refresh=st.booleans(),
)
def test_mutations_raise_only_domain_errors(
    base: bytes, edits: list[tuple[int, int]], cut: int | None, extra: bytes, refresh: bool
) -> None:
    data = _mutate(base, edits, cut, extra)
    if refresh:  # unless too damaged for the test helper to walk: then parse it as it is
        with contextlib.suppress(IndexError, struct.error, ValueError):
            data = refresh_footer(data)
    try:
        image = parse_app_image(data, 4096)
    except (InvalidImage, LimitExceeded) as e:
        assert type(e) in (InvalidImage, LimitExceeded)
        assert str(e)
    else:
        assert isinstance(image, AppImage)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=600).map(lambda b: b"\xe9" + b))
def test_random_bytes_raise_only_domain_errors(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        parse_app_image(data, 4096)


# --- oracle: esptool image-info agrees on every field it prints -------------------------------------

ORACLE_CASES: list[tuple[str, Callable[[], bytes]]] = [
    *[
        (chip, functools.partial(build_app_image, chip, 24_000, seed=i))
        for i, chip in enumerate(SUPPORTED_CHIPS)
    ],
    (
        "esp32 1.5 MiB",
        lambda: build_app_image("esp32", 3 * MIB // 2, secure_version=31, version="v9.9.9-dirty", segments=6),
    ),
    (
        "esp32s3 no hash",
        lambda: build_app_image("esp32s3", 8192, hash_appended=False, segments=1, project_name="sensor-fw"),
    ),
    ("esp32c3 16 segments", lambda: build_app_image("esp32c3", 65_536, segments=16, min_chip_rev_full=3)),
    (
        "esp32c6 long idf_ver",
        lambda: build_app_image("esp32c6", 100_000, secure_version=16, idf_ver="v5.4-dev-1234-gabcdef"),
    ),
    (
        "esp32c5 revisions",
        lambda: build_app_image("esp32c5", 40_000, min_chip_rev_full=100, entry_addr=0x40800ABC),
    ),
]


def _custom_header_image() -> bytes:
    """DOUT, 16 MB at 80m, WP pin 5 and distinct pin drive strengths: fields the builder leaves default."""
    data = build_app_image("esp32s3", 12_000, seed=8)
    return refresh_footer(_edit(data, 2, b"\x03\x4f" + data[4:8] + b"\x05\x21\x43\x65"))


def _revision(full: int) -> str:
    return f"{full // 100}.{full % 100}"


def _esptool_lines(image: AppImage) -> list[str]:
    """What ``esptool --chip X image-info`` prints for ``image``, rendered from our parse."""
    targets = pytest.importorskip("esptool.targets")
    rom = targets.CHIP_DEFS[image.chip.name]
    sizes = {v: k for k, v in reversed(rom.FLASH_SIZES.items())}
    freqs = {v: k for k, v in reversed(rom.FLASH_FREQUENCY.items())}
    drive = [n for byte in image.spi_pin_drv for n in (byte & 0xF, byte >> 4)]
    lines = [
        f"Image size: {image.size} bytes",
        f"Entry point: {image.entry_addr:#8x}",
        f"Segments: {image.segment_count}",
        f"Flash size: {sizes[image.spi_size << 4]}",
        f"Flash freq: {freqs[image.spi_speed]}",
        f"Flash mode: {['QIO', 'QOUT', 'DIO', 'DOUT'][image.spi_mode]}",
        f"WP pin: {image.wp_pin:#02x}" + (" (disabled)" if image.wp_pin == 0xEE else ""),
        "Flash pins drive settings: clk_drv: {:#x}, q_drv: {:#x}, d_drv: {:#x}, cs0_drv: {:#x}, "
        "hd_drv: {:#x}, wp_drv: {:#x}".format(*drive),
        f"Chip ID: {image.chip.chip_id} ({image.chip.display_name})",
        f"Minimal chip revision: v{_revision(image.min_chip_rev_full)}, "
        f"(legacy min_rev = {image.min_chip_rev})",
        f"Maximal chip revision: v{_revision(image.max_chip_rev_full)}",
        f"Checksum: {image.checksum:#04x} (valid)",
        f"Project name: {image.project_name}",
        f"App version: {image.version}",
        f"Compile time: {image.date} {image.time}",
        f"ELF file SHA256: {image.app_elf_sha256.hex()}",
        f"ESP-IDF: {image.idf_ver}",
        f"Minimal eFuse block revision: {_revision(image.min_efuse_blk_rev_full)}",
        f"Maximal eFuse block revision: {_revision(image.max_efuse_blk_rev_full)}",
        f"MMU page size: {2**image.mmu_page_size // 1024} KB",
        f"Secure version: {image.secure_version}",
    ]
    if image.appended_sha256 is not None:
        lines.append(f"Validation hash: {image.appended_sha256.hex()} (valid)")
    for index, segment in enumerate(image.segments):
        lines.append(
            f"{index:7}  {segment.length:#07x}  {segment.load_addr:#010x}  {segment.header_offset:#010x}  "
        )
    return lines


def test_esptool_image_info_agrees(tmp_path: Path) -> None:
    files, images = [], []
    cases = [*ORACLE_CASES, ("esp32s3 custom header", _custom_header_image)]
    for n, (_, build) in enumerate(cases):
        data = build()
        path = tmp_path / f"{n}.bin"
        path.write_bytes(data)
        files.append(path)
        images.append(parse_app_image(data, MAX))
    results = run_all(
        [
            ("esptool", "--chip", image.chip.name, "image-info", str(path))
            for image, path in zip(images, files, strict=True)
        ]
    )
    for (label, _), image, result in zip(cases, images, results, strict=True):
        assert result.returncode == 0, result.stdout + result.stderr
        printed = result.stdout.splitlines()
        for line in _esptool_lines(image):
            if line.endswith("  "):  # a segment row: esptool appends the memory types
                assert any(p.startswith(line) for p in printed), (label, line, result.stdout)
            else:
                assert line in printed, (label, line, result.stdout)
        segment_rows = [p for p in printed if p[:7].strip().isdigit() and "0x" in p]
        assert len(segment_rows) == image.segment_count
        assert "invalid" not in result.stdout


def test_esptool_refuses_what_we_refuse(tmp_path: Path) -> None:
    """Damage esptool also detects (it reports a bad checksum or hash as 'invalid', not as an error)."""
    cases = {
        name: MALFORMED[name][0]()
        for name in ("bad checksum", "bad hash", "bad magic", "truncated in the data")
    }
    for name, data in cases.items():
        (tmp_path / f"{name}.bin").write_bytes(data)
    results = run_all(
        [("esptool", "--chip", "esp32s3", "image-info", str(tmp_path / f"{name}.bin")) for name in cases]
    )
    outcome = dict(zip(cases, results, strict=True))
    assert "Checksum: " in outcome["bad checksum"].stdout
    assert "invalid - calculated" in outcome["bad checksum"].stdout
    assert "(invalid)" in outcome["bad hash"].stdout
    assert outcome["bad magic"].returncode != 0
    assert outcome["truncated in the data"].returncode != 0
