"""FKSP v1 encoding (``kms.domain.sealed``): the vectors, the parsing rules, and resumable output.

The vectors in ``tests/vectors/sealed`` come from ``generate.py``, an encoder written from the spec without
``kms.domain.sealed``; the service's encoder must reproduce them byte for byte and the Python device model
must decode them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.domain import sealed
from kms.domain.errors import InvalidArgument, OutOfRange
from kmsctl.device import DeviceModel, Verdict, verify_p256_signature
from kmsctl.device.decoder import manifest_key_id

VECTORS = Path(__file__).parents[1] / "vectors" / "sealed"
VECTOR_NAMES = sorted(path.stem for path in VECTORS.glob("*.json"))
KEY_ID = bytes(range(32))


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fksp_vector_generator", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()


def _vector(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text())
    return data


def _encode(
    vector: dict[str, Any],
) -> tuple[sealed.SealedHeader, sealed.Manifest, bytes, sealed.SealedPayload]:
    inputs = vector["inputs"]
    image: bytes = GENERATOR.plaintext(inputs["plaintext"])
    key_id = bytes.fromhex(vector["intermediates"]["manifest_key_id"])
    header = sealed.SealedHeader(inputs["segment_size"], len(image), key_id)
    fields = inputs["manifest"]
    manifest = sealed.Manifest(
        image_sha256=hashlib.sha256(image).digest(),
        image_size=len(image),
        secure_version=fields["secure_version"],
        chip_id=inputs["chip_id"],
        device_id=inputs["device_id"],
        product=fields["product"],
        version=fields["version"],
        release_time=fields["release_time"],
    )
    info = sealed.key_derivation_info(manifest, sealed.signed_bytes(header, manifest))
    key = sealed.hkdf_expand_one_block(bytes.fromhex(inputs["device_secret"]), info)
    payload = sealed.SealedPayload(header, manifest, bytes.fromhex(inputs["signature"]), key, image)
    return header, manifest, info, payload


def test_there_are_vectors_of_every_required_shape() -> None:
    shapes = {
        (v["inputs"]["segment_size"], v["intermediates"]["image_size"]) for v in map(_vector, VECTOR_NAMES)
    }
    assert any(size % s == 0 and size > s for s, size in shapes)  # exact multiple of S
    assert any(size < s for s, size in shapes)  # smaller than one segment
    assert any(size % s and size > s for s, size in shapes)  # short last segment
    assert {256, 4096, 1 << 20} <= {s for s, _ in shapes}


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_generator_reproduces_the_stored_vector(name: str) -> None:
    assert GENERATOR.render(GENERATOR.vector(name)) == (VECTORS / f"{name}.json").read_text()


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_encoder_reproduces_every_intermediate(name: str) -> None:
    vector = _vector(name)
    expected = vector["intermediates"]
    header, manifest, info, payload = _encode(vector)
    count = header.segment_count
    signed = sealed.signed_bytes(header, manifest)
    assert header.to_bytes().hex() == expected["header"]
    assert manifest.to_bytes().hex() == expected["manifest"]
    assert hashlib.sha256(signed).hexdigest() == expected["header_manifest_sha256"]
    assert info.hex() == expected["info"]
    key = sealed.hkdf_expand_one_block(bytes.fromhex(vector["inputs"]["device_secret"]), info)
    assert key.hex() == expected["payload_key"]
    assert count == expected["segment_count"]
    assert sealed.nonce(0, count == 1).hex() == expected["first_nonce"]
    assert sealed.nonce(count - 1, True).hex() == expected["last_nonce"]
    assert payload.total_size() == expected["payload_size"]
    digest = hashlib.sha256()
    for piece in payload.iter_bytes():
        digest.update(piece)
    assert digest.hexdigest() == expected["payload_sha256"]
    if "payload" in expected:
        assert b"".join(payload.iter_bytes()).hex() == expected["payload"]
    segment_0_end = sealed.PREFIX_LEN + min(header.segment_size, header.image_size) + sealed.TAG_LEN
    tag_0 = next(payload.iter_bytes(segment_0_end - 16, chunk=16))
    assert tag_0.hex() == expected["first_segment_tag"]
    assert next(payload.iter_bytes(payload.total_size() - 16)).hex() == expected["last_segment_tag"]


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_parsers_read_back_the_vector(name: str) -> None:
    vector = _vector(name)
    header, manifest, _, _ = _encode(vector)
    assert sealed.SealedHeader.from_bytes(bytes.fromhex(vector["intermediates"]["header"])) == header
    assert sealed.Manifest.from_bytes(bytes.fromhex(vector["intermediates"]["manifest"])) == manifest


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_device_model_decodes_the_vector(name: str) -> None:
    vector = _vector(name)
    inputs, expected = vector["inputs"], vector["intermediates"]
    image: bytes = GENERATOR.plaintext(inputs["plaintext"])
    der = bytes.fromhex(expected["manifest_public_key_der"])
    device = DeviceModel(
        efuse_secret=bytes.fromhex(inputs["device_secret"]),
        device_id=inputs["device_id"].encode(),
        chip_id=inputs["chip_id"],
        manifest_keys_der=[der],
        floor=inputs["manifest"]["secure_version"],
        slot_size=2 << 20,
    )
    key = next(iter(device.context().manifest_keys.values()))
    assert manifest_key_id(key).hex() == expected["manifest_key_id"]
    signature = bytes.fromhex(inputs["signature"])
    assert verify_p256_signature(key, bytes.fromhex(expected["header_manifest_sha256"]), signature)
    _, _, _, payload = _encode(vector)
    result = device.apply_update(payload.iter_bytes(chunk=1500))
    assert result.verdict is Verdict.OK, result.detail
    assert device.running_image() == image
    assert device.state().running_slot == 1


# --- header rules -------------------------------------------------------------------------------------

GOOD_HEADER = sealed.SealedHeader(4096, 10_000, KEY_ID)


def _patched_header(offset: int, fmt: str, value: int | bytes) -> bytes:
    raw = bytearray(GOOD_HEADER.to_bytes())
    struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (0, "<4s", b"FKSQ", "not an FKSP payload"),
        (4, "<B", 2, "format version 2"),
        (5, "<B", 0, "suite 0"),
        (6, "<H", 65, "header length .* 65"),
        (24, "<I", 255, "manifest length .* 255"),
        (28, "<I", 72, "signature length .* 72"),
        (8, "<I", 255, "segment size .* 255"),
        (8, "<I", (1 << 20) + 1, "segment size .* 1048577"),
        (16, "<Q", 0, "image size .* 0"),
        (12, "<I", 2, "segment count .* 2, .* has 3"),
        (12, "<I", 0, "segment count .* 0"),
    ],
)
def test_header_parser_names_the_broken_rule(offset: int, fmt: str, value: int | bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        sealed.SealedHeader.from_bytes(_patched_header(offset, fmt, value))


def test_header_parser_checks_length_and_reads_back_the_limits() -> None:
    with pytest.raises(InvalidArgument, match="64 bytes, not 63"):
        sealed.SealedHeader.from_bytes(GOOD_HEADER.to_bytes()[:63])
    for size_s in (256, 1 << 20):
        header = sealed.SealedHeader(size_s, 1, KEY_ID)
        assert sealed.SealedHeader.from_bytes(header.to_bytes()) == header
        assert header.segment_count == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"segment_size": 128}, "segment size"),
        ({"image_size": 0}, "image size"),
        ({"manifest_key_id": b"short"}, "32 bytes"),
        ({"segment_size": 256, "image_size": 256 * (1 << 32) + 1}, "at most 4294967295"),
    ],
)
def test_header_constructor_refuses_what_it_could_not_encode(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"segment_size": 4096, "image_size": 1, "manifest_key_id": KEY_ID, **kwargs}
    with pytest.raises(InvalidArgument, match=message):
        sealed.SealedHeader(**fields)


# --- manifest rules -----------------------------------------------------------------------------------

GOOD_MANIFEST = sealed.Manifest(
    image_sha256=bytes(32),
    image_size=10_000,
    secure_version=3,
    chip_id=0x0009,
    device_id="dev-1",
    product="thermostat",
    version="1.0",
    release_time=1767225600,
)


def _patched_manifest(offset: int, value: bytes) -> bytes:
    raw = bytearray(GOOD_MANIFEST.to_bytes())
    raw[offset : offset + len(value)] = value
    return bytes(raw)


def test_manifest_layout_is_the_spec_table() -> None:
    raw = GOOD_MANIFEST.to_bytes()
    assert len(raw) == 256
    assert struct.unpack_from("<QIHH", raw, 32) == (10_000, 3, 0x0009, 0)
    assert raw[48:54] == b"\x05dev-1" and raw[113:124] == b"\x0athermostat" and raw[177:181] == b"\x031.0"
    assert struct.unpack_from("<Q", raw, 210) == (1767225600,)
    assert sealed.Manifest.from_bytes(raw) == GOOD_MANIFEST


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (46, b"\x01", "bytes 46..47 are reserved"),
        (218, b"\x01", "byte 218 is not"),
        (255, b"\x80", "byte 255 is not"),
        (32, bytes(8), "image size .* is 0"),
        (48, b"\x00", "device id length .* is 0"),
        (48, b"\x41", "device id length .* is 65"),
        (54, b"x", r"device id padding \(manifest bytes 54..112\)"),
        (49, b"\x7f", "device id .* not printable ASCII"),
        (49, b"\x1f", "device id .* not printable ASCII"),
        (113, b"\x00", "product length .* is 0"),
        (113, b"\x40", "product length .* is 64"),
        (176, b"x", "product padding"),
        (114, b"\xc3", "product .* not printable ASCII"),
        (177, b"\x21", "version length .* is 33"),
        (209, b"x", "version padding"),
        (178, b"\xff", "version .* not UTF-8"),
    ],
)
def test_manifest_parser_names_the_broken_rule(offset: int, value: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        sealed.Manifest.from_bytes(_patched_manifest(offset, value))


def test_manifest_parser_accepts_every_length_limit() -> None:
    longest = sealed.Manifest(
        image_sha256=bytes(range(32)),
        image_size=(1 << 64) - 1,
        secure_version=(1 << 32) - 1,
        chip_id=0xFFFF,
        device_id=" " + "~" * 63,
        product="p" * 63,
        version="é" * 16,
        release_time=(1 << 64) - 1,
    )
    assert sealed.Manifest.from_bytes(longest.to_bytes()) == longest
    empty_version = dataclasses.replace(GOOD_MANIFEST, version="")
    assert sealed.Manifest.from_bytes(empty_version.to_bytes()).version == ""
    with pytest.raises(InvalidArgument, match="256 bytes, not 255"):
        sealed.Manifest.from_bytes(GOOD_MANIFEST.to_bytes()[:255])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"device_id": ""}, "device id"),
        ({"device_id": "d" * 65}, "device id"),
        ({"device_id": "dév"}, "device id"),
        ({"device_id": "a\nb"}, "device id"),
        ({"product": "p" * 64}, "product"),
        ({"version": "é" * 17}, "longer than 32 bytes"),
        ({"image_sha256": bytes(31)}, "32 bytes"),
        ({"image_size": 0}, "image size"),
        ({"secure_version": 1 << 32}, "secure_version"),
        ({"chip_id": -1}, "chip id"),
        ({"release_time": True}, "release time"),
    ],
)
def test_manifest_constructor_refuses_unencodable_fields(change: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        dataclasses.replace(GOOD_MANIFEST, **change)


# --- key derivation info, nonces, payload assembly ----------------------------------------------------


def test_key_derivation_info_layout() -> None:
    header = sealed.SealedHeader(4096, 10_000, KEY_ID)
    signed = sealed.signed_bytes(header, GOOD_MANIFEST)
    info = sealed.key_derivation_info(GOOD_MANIFEST, signed)
    assert info == b"FKSP/1 payload key\x00\x05dev-1" + bytes(32) + hashlib.sha256(signed).digest()
    assert len(info) == 18 + 1 + 1 + 5 + 32 + 32


def test_key_derivation_info_refuses_inconsistent_inputs() -> None:
    header = sealed.SealedHeader(4096, 10_000, KEY_ID)
    signed = sealed.signed_bytes(header, GOOD_MANIFEST)
    other = dataclasses.replace(GOOD_MANIFEST, device_id="dev-2")
    with pytest.raises(InvalidArgument, match="do not encode the manifest"):
        sealed.key_derivation_info(other, signed)
    with pytest.raises(InvalidArgument, match="320 bytes"):
        sealed.key_derivation_info(GOOD_MANIFEST, signed + b"\x00")
    with pytest.raises(InvalidArgument, match="not an FKSP payload"):
        sealed.key_derivation_info(GOOD_MANIFEST, b"X" + signed[1:])
    with pytest.raises(InvalidArgument, match="differs from the manifest's"):
        sealed.signed_bytes(sealed.SealedHeader(4096, 9_999, KEY_ID), GOOD_MANIFEST)


def test_nonce_layout() -> None:
    assert sealed.nonce(0, False) == bytes(12)
    assert sealed.nonce(0, True) == bytes(11) + b"\x01"
    assert sealed.nonce(0x01020304, False) == bytes(7) + b"\x01\x02\x03\x04\x00"
    assert sealed.nonce((1 << 32) - 1, True) == bytes(7) + b"\xff" * 4 + b"\x01"
    for bad in (-1, 1 << 32):
        with pytest.raises(InvalidArgument, match="segment index"):
            sealed.nonce(bad, False)


def test_hkdf_refuses_a_short_prk() -> None:
    with pytest.raises(InvalidArgument, match="at least 32 bytes"):
        sealed.hkdf_expand_one_block(bytes(31), b"info")


def _payload(image: bytes, segment_size: int) -> sealed.SealedPayload:
    header = sealed.SealedHeader(segment_size, len(image), KEY_ID)
    manifest = dataclasses.replace(
        GOOD_MANIFEST, image_sha256=hashlib.sha256(image).digest(), image_size=len(image)
    )
    return sealed.SealedPayload(header, manifest, bytes(64), bytes(range(32)), image)


def test_payload_refuses_parts_that_do_not_fit() -> None:
    image = bytes(range(256)) * 4
    header = sealed.SealedHeader(256, len(image), KEY_ID)
    manifest = dataclasses.replace(
        GOOD_MANIFEST, image_sha256=hashlib.sha256(image).digest(), image_size=len(image)
    )
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: sealed.SealedPayload(header, manifest, bytes(63), bytes(32), image), "64 bytes"),
        (lambda: sealed.SealedPayload(header, manifest, bytes(64), bytes(16), image), "32 bytes"),
        (lambda: sealed.SealedPayload(header, manifest, bytes(64), bytes(32), image[:-1]), "the header says"),
        (
            lambda: sealed.SealedPayload(header, manifest, bytes(64), bytes(32), image[::-1]),
            "SHA-256 differs",
        ),
        (lambda: sealed.SealedPayload(header, GOOD_MANIFEST, bytes(64), bytes(32), image), "image size"),
    ]
    for build, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            build()
    assert "key" not in repr(sealed.SealedPayload(header, manifest, bytes(64), bytes(32), image)).lower()


def test_a_hashed_image_is_hashed_once_and_frozen() -> None:
    data = bytearray(b"image bytes" * 100)
    hashed = sealed.HashedImage(data)
    data[0] ^= 1
    assert bytes(hashed.data) == b"image bytes" * 100 and hashed.data.readonly
    assert hashed.sha256 == hashlib.sha256(b"image bytes" * 100).digest()
    assert hashed.sha256.hex() in repr(hashed)
    plain = _payload(b"image bytes" * 100, 256)
    header = sealed.SealedHeader(256, 1100, KEY_ID)
    manifest = dataclasses.replace(GOOD_MANIFEST, image_sha256=hashed.sha256, image_size=1100)
    shared = sealed.SealedPayload(header, manifest, bytes(64), bytes(range(32)), hashed)
    assert b"".join(shared.iter_bytes()) == b"".join(plain.iter_bytes())
    with pytest.raises(InvalidArgument, match="SHA-256 differs"):
        sealed.SealedPayload(header, manifest, bytes(64), bytes(32), sealed.HashedImage(bytes(1100)))
    with pytest.raises(InvalidArgument, match="the header says"):
        sealed.SealedPayload(header, manifest, bytes(64), bytes(32), sealed.HashedImage(bytes(10)))


def test_iter_bytes_from_every_offset_is_the_suffix() -> None:
    payload = _payload(bytes(range(256)) * 2 + b"tail" * 22, 256)  # 600 bytes: 3 segments, last short
    full = b"".join(payload.iter_bytes())
    assert len(full) == payload.total_size() == 384 + 600 + 3 * 16
    for offset in range(len(full) + 1):
        assert b"".join(payload.iter_bytes(offset, chunk=97)) == full[offset:]
    pieces = list(payload.iter_bytes(5, chunk=100))
    assert [len(p) for p in pieces[:-1]] == [100] * (len(pieces) - 1) and 0 < len(pieces[-1]) <= 100


def test_iter_bytes_checks_offset_and_chunk() -> None:
    payload = _payload(b"x" * 300, 256)
    total = payload.total_size()
    assert list(payload.iter_bytes(total)) == []
    for offset in (-1, total + 1):
        with pytest.raises(OutOfRange, match=re.escape(f"payload of {total} bytes")):
            payload.iter_bytes(offset)
    with pytest.raises(InvalidArgument, match="chunk"):
        payload.iter_bytes(0, chunk=0)


class _CountingAead:
    """Wraps the payload's AESGCM and records the segment index of every nonce it seals under."""

    def __init__(self, aead: Any) -> None:
        self._aead = aead
        self.indices: list[int] = []
        self.nonces: list[bytes] = []

    def encrypt_into(self, nonce: bytes, data: Any, associated_data: None, buf: Any) -> int:
        self.indices.append(int.from_bytes(nonce[7:11], "big"))
        self.nonces.append(nonce)
        return int(self._aead.encrypt_into(nonce, data, associated_data, buf))


def test_the_sealing_loop_uses_the_specified_nonces(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _payload(bytes(range(256)) * 4 + b"tail", 256)  # 5 segments, the last 4 bytes
    aead = _CountingAead(payload._aead)
    monkeypatch.setattr(payload, "_aead", aead)
    assert len(b"".join(payload.iter_bytes(chunk=1000))) == payload.total_size()  # direct and straddled
    assert aead.nonces == [sealed.nonce(i, i == 4) for i in range(5)]


def test_iter_bytes_encrypts_only_the_segments_it_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _payload(bytes(100 * 256), 256)
    aead = _CountingAead(payload._aead)
    monkeypatch.setattr(payload, "_aead", aead)
    iterator = payload.iter_bytes(payload.total_size() - 20, chunk=8)
    assert aead.indices == []
    next(iterator)
    assert aead.indices == [99]
    assert len(list(iterator)) == 2 and aead.indices == [99]  # the rest of a straddled segment: no re-seal
    aead.indices.clear()
    first = payload.iter_bytes(0, chunk=384 + 272)
    next(first)
    assert aead.indices == [0]
    aead.indices.clear()
    straddling = payload.iter_bytes(0, chunk=384 + 272 + 100)  # the second piece starts inside segment 1
    assert [len(piece) for piece in (next(straddling), next(straddling))] == [756, 756]
    assert aead.indices == [0, 1, 2, 3, 4]  # segment 1 sealed once for both pieces


def test_iter_bytes_memory_stays_bounded_for_a_large_image() -> None:
    image = bytes(8 << 20)
    payload = _payload(image, 4096)
    tracemalloc.start()
    try:
        total = sum(len(piece) for piece in payload.iter_bytes())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == payload.total_size()
    assert peak < 512 * 1024


@settings(max_examples=60, deadline=None)
@given(
    segment_size=st.sampled_from([256, 300, 1024, 4096]),
    image_size=st.integers(1, 5000),
    data=st.data(),
)
def test_iter_bytes_resumes_anywhere(segment_size: int, image_size: int, data: st.DataObject) -> None:
    image = bytes((i * 7 + 3) & 0xFF for i in range(image_size))
    payload = _payload(image, segment_size)
    full = b"".join(payload.iter_bytes(chunk=1 << 16))
    offset = data.draw(st.integers(0, len(full)))
    chunk = data.draw(st.integers(1, 9000))
    assert b"".join(payload.iter_bytes(offset, chunk)) == full[offset:]
