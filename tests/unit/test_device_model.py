"""The Python device reference: the tamper matrix, power cuts, and slot switching (``kmsctl.device``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsctl.device import (
    DecodedManifest,
    DeviceModel,
    ImageTooLarge,
    PayloadRejected,
    PowerCut,
    Verdict,
    cut_stream,
    decode_stream,
)
from tests.support.sealed_tamper import (
    StandardContext,
    TamperCase,
    build_payload,
    standard_context,
    tamper_cases,
)

CONTEXT = standard_context()
CASES = CONTEXT.cases()


def _device(context: StandardContext = CONTEXT, *, slot_size: int = 64 * 1024) -> DeviceModel:
    return DeviceModel(
        efuse_secret=context.device_secret,
        device_id=context.device_id.encode(),
        chip_id=context.chip_id,
        manifest_keys_der=[context.manifest_public_key_der],
        floor=context.floor,
        slot_size=slot_size,
    )


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_matrix_covers_every_required_kind_of_damage() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    verdicts = {case.verdict for case in CASES}
    assert verdicts == {v.value for v in Verdict}
    by_name = {case.name: case.verdict for case in CASES}
    assert by_name["flip header.magic byte 0"] == "bad_header"
    assert by_name["flip manifest.device_id byte 49"] == "bad_signature"
    assert by_name["flip signature byte 0"] == "bad_signature"
    assert by_name["drop segment 3"] == "truncated"
    assert by_name["duplicate segment 3"] == "trailing_data"
    assert by_name["swap segments 0 and 1"] == "bad_segment"
    for i in range(4):
        assert by_name[f"flip segment {i} ciphertext first byte"] == "bad_segment"
        assert by_name[f"flip segment {i} tag last byte"] == "bad_segment"
    # 256 -> 257 keeps 4 segments for 868 bytes: a well-formed header, so the signature catches it.
    assert by_name["flip header.segment_size byte 8"] == "bad_signature"


@pytest.mark.parametrize("chunk", [1 << 20, 1, 97], ids=["whole", "bytewise", "97-byte-chunks"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_tamper_case_verdict_and_running_slot(case: TamperCase, chunk: int) -> None:
    device = _device()
    before, otadata, slot_0 = device.state(), bytes(device.flash.otadata), bytes(device.flash.slots[0])
    result = device.apply_update(_chunks(case.payload, chunk))
    assert result.verdict.value == case.verdict, result.detail
    if case.verdict == "ok":
        assert device.state().running_slot == 1
        assert device.running_image() == CONTEXT.image
        assert device.floor == CONTEXT.secure_version
    else:
        assert device.state() == before
        assert bytes(device.flash.otadata) == otadata
        assert bytes(device.flash.slots[0]) == slot_0
        assert device.floor == CONTEXT.floor


class _RecordingSink:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.manifest: DecodedManifest | None = None

    def begin(self, manifest: DecodedManifest) -> None:
        self.manifest = manifest

    def write(self, offset: int, plaintext: bytes) -> None:
        self.writes.append((offset, plaintext))


def test_only_authenticated_segments_reach_the_sink() -> None:
    case = next(c for c in CASES if c.name == "flip segment 2 tag first byte")
    sink = _RecordingSink()
    with pytest.raises(PayloadRejected) as rejected:
        decode_stream(case.payload, _device().context(), sink)
    assert rejected.value.verdict is Verdict.BAD_SEGMENT
    assert sink.writes == [(0, CONTEXT.image[:256]), (256, CONTEXT.image[256:512])]


def test_nothing_reaches_the_sink_before_the_manifest_is_accepted() -> None:
    for case in CASES:
        if case.verdict in {"bad_header", "bad_signature", "wrong_device", "wrong_chip", "downgrade"}:
            sink = _RecordingSink()
            with pytest.raises(PayloadRejected):
                decode_stream(case.payload, _device().context(), sink)
            assert sink.manifest is None and sink.writes == [], case.name


def test_decoded_manifest_is_the_signed_one() -> None:
    sink = _RecordingSink()
    manifest = decode_stream(memoryview(CONTEXT.payload), _device().context(), sink)
    assert sink.manifest == manifest
    assert (manifest.device_id, manifest.product, manifest.version) == (
        b"tamper-device-0001",
        b"thermostat",
        b"1.4.2",
    )
    assert (manifest.image_size, manifest.segment_size, manifest.segment_count) == (868, 256, 4)
    assert manifest.image_sha256 == hashlib.sha256(CONTEXT.image).digest()
    assert manifest.key_id == CONTEXT.manifest_key_id
    assert b"".join(data for _, data in sink.writes) == CONTEXT.image


def test_a_good_update_switches_slots_and_raises_the_floor() -> None:
    device = _device()
    assert device.state().running_slot == 0 and device.floor == 3
    first = device.apply_update([CONTEXT.payload])
    assert first.verdict is Verdict.OK
    assert (device.state().running_slot, device.floor) == (1, 5)
    key = ec.derive_private_key(CONTEXT.manifest_private_scalar, ec.SECP256R1())
    newer_image = b"newer release " * 100
    newer = build_payload(
        secret=CONTEXT.device_secret,
        device_id=CONTEXT.device_id,
        chip_id=CONTEXT.chip_id,
        secure_version=6,
        image=newer_image,
        segment_size=4096,
        signer=key,
    )
    assert device.apply_update([newer]).verdict is Verdict.OK
    assert (device.state().running_slot, device.floor, device.running_image()) == (0, 6, newer_image)
    after = device.state()
    assert device.apply_update([CONTEXT.payload]).verdict is Verdict.DOWNGRADE
    assert device.state() == after
    assert device.boot() == after


def test_untrusted_device_keys_and_oversized_images_leave_the_device_alone() -> None:
    stranger = DeviceModel(
        efuse_secret=CONTEXT.device_secret,
        device_id=CONTEXT.device_id.encode(),
        chip_id=CONTEXT.chip_id,
        manifest_keys_der=[],
        floor=0,
    )
    before = stranger.state()
    assert stranger.apply_update([CONTEXT.payload]).verdict is Verdict.BAD_SIGNATURE
    assert stranger.state() == before
    small = _device(slot_size=512)
    before = small.state()
    with pytest.raises(ImageTooLarge):
        small.apply_update([CONTEXT.payload])
    assert small.state() == before


def _operation_log(payload: bytes) -> list[str]:
    device = _device()
    start = device.power.operations
    assert device.apply_update([payload]).verdict is Verdict.OK
    return device.power.log[start:]


def test_a_power_cut_at_any_hardware_operation_keeps_a_bootable_device() -> None:
    log = _operation_log(CONTEXT.payload)
    commit = log.index("write otadata 0")
    assert log[0].startswith("erase slot 1") and log[-1].startswith("burn secure_version")
    for cut in range(len(log)):
        device = _device()
        before = device.state()
        device.power.cut_at = cut
        with pytest.raises(PowerCut):
            device.apply_update([CONTEXT.payload])
        after = device.boot()
        if cut <= commit:
            assert after == before, log[cut]
        else:  # committed: the new app runs, and boot raises the floor the cut kept from being burned
            assert (after.running_slot, after.floor) == (1, CONTEXT.secure_version)
            assert device.running_image() == CONTEXT.image
        retry = device.apply_update([CONTEXT.payload])
        assert retry.verdict is Verdict.OK and device.running_image() == CONTEXT.image


def test_a_power_cut_at_any_input_byte_leaves_the_running_slot() -> None:
    payload = CONTEXT.payload
    for at in range(len(payload)):
        device = _device()
        before = device.state()
        with pytest.raises(PowerCut):
            device.apply_update(cut_stream(payload, at, chunk=50))
        assert device.boot() == before


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), data=st.data())
def test_random_power_cuts_in_a_multi_sector_update(seed: int, data: st.DataObject) -> None:
    key = ec.derive_private_key(CONTEXT.manifest_private_scalar, ec.SECP256R1())
    image = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 700  # 22400 bytes: 6 sectors
    payload = build_payload(
        secret=CONTEXT.device_secret,
        device_id=CONTEXT.device_id,
        chip_id=CONTEXT.chip_id,
        secure_version=4,
        image=image,
        segment_size=4096,
        signer=key,
    )
    device = _device()
    before = device.state()
    if data.draw(st.booleans()):
        device.power.cut_at = data.draw(st.integers(0, 20))
        source: Iterator[bytes] = _chunks(payload, 1000)
    else:
        source = cut_stream(payload, data.draw(st.integers(0, len(payload) - 1)), chunk=777)
    try:
        result = device.apply_update(source)
    except PowerCut:
        after = device.boot()
        assert after == before or (after.running_slot == 1 and device.running_image() == image)
    else:  # the cut point lay beyond the last operation
        assert result.verdict is Verdict.OK and device.running_image() == image
        device.power.cut_at = None
    assert device.apply_update([payload]).verdict is Verdict.OK
    assert device.running_image() == image and device.floor == 4


def test_matrix_api_rejects_a_payload_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="length"):
        tamper_cases(
            CONTEXT.payload[:-1],
            segment_size=256,
            image_size=868,
            other_device_payload=CONTEXT.other_device_payload,
            downgrade_payload=CONTEXT.downgrade_payload,
        )
