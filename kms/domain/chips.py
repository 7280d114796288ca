"""The ESP32 family: which chip an image is for, and what its Secure Boot V2 ROM accepts.

Each chip is identified in an app image header by ``chip_id`` (a u16 at offset 12, see
``kms.domain.esp_image``). The facts below come from ESP-IDF (``soc_caps.h``, the Secure Boot V2 guide)
and from the eFuse tables that espefuse ships:

========  =======  ===============================  ========  =========================
chip      chip_id  Secure Boot V2 schemes           key slots secure_version eFuse bits
========  =======  ===============================  ========  =========================
esp32     0x0000   RSA-3072 (chip revision ≥ v3.0)  1         32
esp32s2   0x0002   RSA-3072                         3         16
esp32c3   0x0005   RSA-3072                         3         16
esp32s3   0x0009   RSA-3072                         3         16
esp32c2   0x000C   ECDSA-P256                       1         4
esp32c6   0x000D   RSA-3072, ECDSA-P256             3         16
esp32h2   0x0010   RSA-3072, ECDSA-P256             3         16
esp32p4   0x0012   RSA-3072, ECDSA-P256             3         16
esp32c61  0x0014   ECDSA-P256                       3         16
esp32c5   0x0017   RSA-3072, ECDSA-P256, -P384      3         9
========  =======  ===============================  ========  =========================

The anti-rollback counter is thermometer-coded: the bootloader counts the burned bits of the
``SECURE_VERSION`` eFuse field, so a chip with a 16-bit field can count up to secure_version 16.

A device's bootloader is built for one scheme (``CONFIG_SECURE_BOOT_V2_RSA_ENABLED`` or ``..._ECC_ENABLED``)
and, for ECDSA, one curve (``CONFIG_SECURE_BOOT_ECDSA_KEY_LEN_*``), so all Secure Boot V2 keys of a product
must use the same algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kms.domain.errors import FailedPrecondition, InvalidArgument, InvalidImage
from kms.domain.keys import Algorithm

_RSA = Algorithm.RSA_3072_PSS_SHA256
_P256 = Algorithm.ECDSA_P256_SHA256
_P384 = Algorithm.ECDSA_P384_SHA384

_ALGORITHM_LABELS = {_RSA: "RSA-3072", _P256: "ECDSA-P256", _P384: "ECDSA-P384"}


@dataclass(frozen=True)
class Chip:
    """One ESP32-family chip as the image format and the Secure Boot V2 ROM see it.

    ``name`` is the name esptool uses (``esp32s3``); ``sbv2_algorithms`` is in order of preference;
    ``sbv2_min_rev_full`` is the lowest chip revision (major * 100 + minor) with Secure Boot V2.
    """

    name: str
    chip_id: int
    sbv2_algorithms: tuple[Algorithm, ...]
    sbv2_max_keys: int
    max_secure_version: int
    sbv2_min_rev_full: int = 0

    @property
    def display_name(self) -> str:
        """The marketing name, e.g. ``ESP32-S3``."""
        suffix = self.name.removeprefix("esp32")
        return "ESP32" + (f"-{suffix.upper()}" if suffix else "")

    def __str__(self) -> str:
        return self.name


ESP32 = Chip("esp32", 0x0000, (_RSA,), 1, 32, sbv2_min_rev_full=300)
ESP32_S2 = Chip("esp32s2", 0x0002, (_RSA,), 3, 16)
ESP32_C3 = Chip("esp32c3", 0x0005, (_RSA,), 3, 16)
ESP32_S3 = Chip("esp32s3", 0x0009, (_RSA,), 3, 16)
ESP32_C2 = Chip("esp32c2", 0x000C, (_P256,), 1, 4)
ESP32_C6 = Chip("esp32c6", 0x000D, (_RSA, _P256), 3, 16)
ESP32_H2 = Chip("esp32h2", 0x0010, (_RSA, _P256), 3, 16)
ESP32_P4 = Chip("esp32p4", 0x0012, (_RSA, _P256), 3, 16)
ESP32_C61 = Chip("esp32c61", 0x0014, (_P256,), 3, 16)
ESP32_C5 = Chip("esp32c5", 0x0017, (_RSA, _P256, _P384), 3, 9)

ALL_CHIPS: tuple[Chip, ...] = (
    ESP32,
    ESP32_S2,
    ESP32_C3,
    ESP32_S3,
    ESP32_C2,
    ESP32_C6,
    ESP32_H2,
    ESP32_P4,
    ESP32_C61,
    ESP32_C5,
)
_BY_ID = {chip.chip_id: chip for chip in ALL_CHIPS}
_BY_NAME = {chip.name: chip for chip in ALL_CHIPS}


def chip_by_id(chip_id: int) -> Chip:
    """The chip an image header names; ``InvalidImage`` for an id this service does not support."""
    chip = _BY_ID.get(chip_id)
    if chip is None:
        known = ", ".join(f"{c.name} {c.chip_id:#06x}" for c in ALL_CHIPS)
        raise InvalidImage(f"unknown chip id {chip_id:#06x} (supported: {known})")
    return chip


def chip_by_name(name: str) -> Chip:
    """The chip of an esptool name (``esp32s3``, or ``ESP32-S3``); ``InvalidArgument`` if unknown."""
    chip = _BY_NAME.get(name.lower().replace("-", ""))
    if chip is None:
        known = ", ".join(_BY_NAME)
        raise InvalidArgument(f"unknown chip {name!r}; expected one of: {known}")
    return chip


def check_sbv2_keys(
    chip: Chip, algorithms: Sequence[Algorithm], key_names: Sequence[str] | None = None
) -> None:
    """Refuse a product's Secure Boot V2 key set that ``chip`` could not use.

    ``algorithms`` are the keys' algorithms in slot order; ``key_names`` (same length) name them in
    messages, default ``slot 0``, ``slot 1``, .... Raises ``FailedPrecondition`` when there are no keys,
    more keys than the chip has digest slots, a key of a scheme the chip's ROM does not accept, or keys of
    different algorithms.
    """
    names = list(key_names) if key_names is not None else [f"slot {i}" for i in range(len(algorithms))]
    if len(names) != len(algorithms):
        raise ValueError("key_names and algorithms differ in length")
    if not algorithms:
        raise FailedPrecondition(f"the product has no Secure Boot V2 key; {chip} images need at least one")
    if len(algorithms) > chip.sbv2_max_keys:
        holds = (
            "one Secure Boot V2 key digest"
            if chip.sbv2_max_keys == 1
            else f"up to {chip.sbv2_max_keys} Secure Boot V2 key digests"
        )
        raise FailedPrecondition(f"{chip} holds {holds}; the product has {len(algorithms)} keys")
    for name, algorithm in zip(names, algorithms, strict=True):
        if algorithm not in chip.sbv2_algorithms:
            raise FailedPrecondition(
                f"{chip} accepts only {_accepted(chip)} Secure Boot V2 signatures; "
                f"product key '{name}' is {algorithm.value}"
            )
    first_name, first = names[0], algorithms[0]
    for name, algorithm in zip(names[1:], algorithms[1:], strict=True):
        if algorithm is not first:
            raise FailedPrecondition(
                "a bootloader verifies one Secure Boot V2 scheme, so all keys of a product must share one "
                f"algorithm; product key '{first_name}' is {first.value}, key '{name}' is {algorithm.value}"
            )


def check_sbv2_chip_revision(chip: Chip, min_chip_rev_full: int) -> None:
    """Refuse an image that may run on a chip revision without Secure Boot V2 (ESP32 before v3.0)."""
    if min_chip_rev_full < chip.sbv2_min_rev_full:
        need, have = chip.sbv2_min_rev_full, min_chip_rev_full
        raise FailedPrecondition(
            f"{chip} supports Secure Boot V2 from chip revision v{need // 100}.{need % 100}, but the image "
            f"allows v{have // 100}.{have % 100}; rebuild it with a minimum chip revision of "
            f"v{need // 100}.{need % 100} or later"
        )


def check_secure_version(chip: Chip, secure_version: int) -> None:
    """Refuse a secure_version the chip's anti-rollback eFuse field cannot count up to."""
    if secure_version > chip.max_secure_version:
        raise FailedPrecondition(
            f"{chip} counts secure versions up to {chip.max_secure_version} in eFuse; "
            f"the image has secure_version {secure_version}"
        )


def _accepted(chip: Chip) -> str:
    labels = [_ALGORITHM_LABELS[a] for a in chip.sbv2_algorithms]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]
