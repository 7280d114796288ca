"""Chips: ids agree with esptool, Secure Boot V2 key rules refuse what the ROM would refuse."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.domain import chips
from kms.domain.chips import (
    ALL_CHIPS,
    check_sbv2_chip_revision,
    check_sbv2_keys,
    check_secure_version,
    chip_by_id,
    chip_by_name,
)
from kms.domain.errors import FailedPrecondition, InvalidArgument, InvalidImage
from kms.domain.keys import Algorithm

RSA = Algorithm.RSA_3072_PSS_SHA256
P256 = Algorithm.ECDSA_P256_SHA256
P384 = Algorithm.ECDSA_P384_SHA384

# From /work/shared/domain.md (esp_image_header_t chip_id); C61 from esptool's targets/esp32c61.py.
EXPECTED_IDS = {
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


def test_chip_ids_match_the_image_format() -> None:
    assert {chip.name: chip.chip_id for chip in ALL_CHIPS} == EXPECTED_IDS


def test_chip_ids_and_names_match_esptool() -> None:
    targets = pytest.importorskip("esptool.targets")
    for chip in ALL_CHIPS:
        rom = targets.CHIP_DEFS[chip.name]
        assert chip.chip_id == rom.IMAGE_CHIP_ID
        assert chip.display_name == rom.CHIP_NAME


@pytest.mark.parametrize("chip", ALL_CHIPS, ids=str)
def test_lookup_by_id_and_name(chip: chips.Chip) -> None:
    assert chip_by_id(chip.chip_id) is chip
    assert chip_by_name(chip.name) is chip
    assert chip_by_name(chip.display_name) is chip


def test_unknown_chip_id_is_an_invalid_image() -> None:
    with pytest.raises(InvalidImage, match=r"unknown chip id 0x0042"):
        chip_by_id(0x42)


def test_unknown_chip_name_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=r"unknown chip 'esp8266'"):
        chip_by_name("esp8266")


@pytest.mark.parametrize(
    ("chip", "algorithms"),
    [
        (chips.ESP32, {RSA}),
        (chips.ESP32_S2, {RSA}),
        (chips.ESP32_S3, {RSA}),
        (chips.ESP32_C3, {RSA}),
        (chips.ESP32_C2, {P256}),
        (chips.ESP32_C61, {P256}),
        (chips.ESP32_C6, {RSA, P256}),
        (chips.ESP32_H2, {RSA, P256}),
        (chips.ESP32_P4, {RSA, P256}),
        (chips.ESP32_C5, {RSA, P256, P384}),
    ],
    ids=str,
)
def test_schemes_per_chip(chip: chips.Chip, algorithms: set[Algorithm]) -> None:
    assert set(chip.sbv2_algorithms) == algorithms
    for algorithm in Algorithm:
        if algorithm in algorithms:
            check_sbv2_keys(chip, [algorithm])
        else:
            with pytest.raises(FailedPrecondition):
                check_sbv2_keys(chip, [algorithm])


def test_wrong_scheme_names_chip_scheme_and_key() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check_sbv2_keys(chips.ESP32_S3, [RSA, P256], ["release-a", "x"])
    assert str(caught.value) == (
        "esp32s3 accepts only RSA-3072 Secure Boot V2 signatures; product key 'x' is ecdsa-p256"
    )


def test_wrong_scheme_lists_every_accepted_scheme() -> None:
    with pytest.raises(
        FailedPrecondition, match=r"esp32c6 accepts only RSA-3072 or ECDSA-P256 .* 'k' is ecdsa-p384"
    ):
        check_sbv2_keys(chips.ESP32_C6, [P384], ["k"])


@pytest.mark.parametrize("chip", [chips.ESP32, chips.ESP32_C2], ids=str)
def test_single_slot_chips_hold_one_key(chip: chips.Chip) -> None:
    algorithm = chip.sbv2_algorithms[0]
    check_sbv2_keys(chip, [algorithm])
    with pytest.raises(FailedPrecondition) as caught:
        check_sbv2_keys(chip, [algorithm, algorithm])
    assert str(caught.value) == f"{chip} holds one Secure Boot V2 key digest; the product has 2 keys"


@pytest.mark.parametrize("chip", [c for c in ALL_CHIPS if c.sbv2_max_keys == 3], ids=str)
def test_three_slot_chips_hold_three_keys(chip: chips.Chip) -> None:
    algorithm = chip.sbv2_algorithms[0]
    check_sbv2_keys(chip, [algorithm] * 3)
    with pytest.raises(
        FailedPrecondition, match=rf"^{chip} holds up to 3 .* digests; the product has 4 keys$"
    ):
        check_sbv2_keys(chip, [algorithm] * 4)


def test_no_key_is_refused() -> None:
    with pytest.raises(FailedPrecondition, match="no Secure Boot V2 key"):
        check_sbv2_keys(chips.ESP32_S3, [])


def test_keys_must_share_one_algorithm() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        check_sbv2_keys(chips.ESP32_C5, [P256, P384], ["a", "b"])
    message = str(caught.value)
    assert "one Secure Boot V2 scheme" in message
    assert "'a' is ecdsa-p256" in message
    assert "'b' is ecdsa-p384" in message


def test_default_key_names_are_slots() -> None:
    with pytest.raises(FailedPrecondition, match=r"product key 'slot 0' is rsa3072-pss"):
        check_sbv2_keys(chips.ESP32_C2, [RSA])
    with pytest.raises(FailedPrecondition, match=r"key 'slot 1' is ecdsa-p256"):
        check_sbv2_keys(chips.ESP32_C6, [RSA, P256])


def test_key_names_must_match_algorithms() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        check_sbv2_keys(chips.ESP32_S3, [RSA], ["a", "b"])


def test_esp32_needs_revision_3_for_secure_boot_v2() -> None:
    check_sbv2_chip_revision(chips.ESP32, 300)
    check_sbv2_chip_revision(chips.ESP32, 301)
    check_sbv2_chip_revision(chips.ESP32_S3, 0)
    with pytest.raises(
        FailedPrecondition, match=r"esp32 supports Secure Boot V2 from chip revision v3\.0.*v1\.0"
    ):
        check_sbv2_chip_revision(chips.ESP32, 100)


@pytest.mark.parametrize(("chip", "limit"), [(chips.ESP32, 32), (chips.ESP32_C2, 4), (chips.ESP32_C5, 9)])
def test_secure_version_limit(chip: chips.Chip, limit: int) -> None:
    check_secure_version(chip, limit)
    with pytest.raises(
        FailedPrecondition, match=rf"{chip} counts secure versions up to {limit} .* {limit + 1}$"
    ):
        check_secure_version(chip, limit + 1)


def test_secure_version_limits_match_espefuse_field_widths() -> None:
    """The anti-rollback field width in espefuse's eFuse tables bounds secure_version (thermometer code)."""
    espefuse = pytest.importorskip("espefuse")
    defs = Path(espefuse.__file__).parent / "efuse_defs"
    for chip in ALL_CHIPS:
        lines = (defs / f"{chip.name}.yaml").read_text().splitlines()
        (line,) = [x for x in lines if x.split(":")[0].strip() == "SECURE_VERSION"]
        width = int(line.split("len")[1].split(",")[0].strip(" :"))
        assert chip.max_secure_version == width, chip
