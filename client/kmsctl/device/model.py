"""A simulated ESP32 that installs FKSP v1 payloads the way OTA firmware should.

The model has what the format relies on: a 32-byte eFuse secret reachable only through an HMAC
(``esp_hmac_calculate``), a device id, a chip id, the trusted manifest keys, an anti-rollback floor (the
eFuse secure_version), and an A/B flash: two app slots and an otadata partition.

otadata holds two 16-byte entries (ESP-IDF keeps two sectors for the same reason)::

    ota_seq u32 | image size u32 | secure_version u32 | CRC-32 of the first 12 bytes u32

An entry counts if its CRC matches and ``ota_seq`` is not 0xFFFFFFFF (erased); the one with the highest
``ota_seq`` selects slot ``(ota_seq - 1) % 2``. Entry ``ota_seq % 2`` is written, so switching slots never
touches the entry in use: a power cut while writing leaves a bad CRC and the old selection.

``apply_key_rollover`` moves the trusted manifest keys along a chain of rollover statements
(``kmsctl.device.rollover``, ``docs/manifest-key-rollover.md``): every statement is checked first, then the
new set is written in ONE operation (a real device writes a second copy with a sequence number and CRC, as
otadata does, so a power cut leaves the old set or the new one, never a mix).

``apply_update`` streams a payload into the inactive slot (only authenticated segments are written), reads the
slot back and checks its SHA-256, writes the new otadata entry (the commit point) and raises the floor.
Every flash erase, flash write and eFuse burn is one *operation*; ``PowerSupply.cut_at`` makes one of them
fail (a write then leaves half its bytes) by raising ``PowerCut``, and ``cut_stream`` fails the input at any
byte. After a cut, ``boot()`` restarts the device; ``state()`` is the deterministic check that the running
slot, its bytes, the otadata entry in use and the floor are what they were.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsctl.device.decoder import (
    Chunk,
    DecodedManifest,
    DeviceContext,
    PayloadRejected,
    Verdict,
    decode_stream,
    hmac_sha256,
    manifest_key_id,
)
from kmsctl.device.rollover import RolloverRejected, RolloverVerdict, split_statements, verify_chain

SECTOR_SIZE = 4096
OTADATA_ENTRY_LEN = 16
_ENTRY = struct.Struct("<IIII")
_ERASED_SEQ = 0xFFFFFFFF


class PowerCut(Exception):
    """The simulated supply failed; the device stopped. Call ``DeviceModel.boot()`` to restart it."""


class FlashVerifyError(Exception):
    """The slot read back does not hold the image the decoder wrote (a flash fault, not a verdict)."""


class ImageTooLarge(Exception):
    """The payload's image does not fit in an app slot of this device (a device limit, not a verdict)."""


class PowerSupply:
    """Counts hardware operations and fails the one numbered ``cut_at`` (counting from 0)."""

    def __init__(self) -> None:
        self.operations = 0
        self.cut_at: int | None = None
        self.log: list[str] = []

    def operation(self, what: str) -> bool:
        """Record one operation; True if the power fails during it."""
        index = self.operations
        self.operations += 1
        self.log.append(what)
        return self.cut_at is not None and index == self.cut_at


class Flash:
    """Two app slots of ``slot_size`` bytes and the otadata partition; erased flash reads 0xFF."""

    def __init__(self, slot_size: int, power: PowerSupply) -> None:
        self.slot_size = slot_size
        self.slots = (bytearray(b"\xff" * slot_size), bytearray(b"\xff" * slot_size))
        self.otadata = bytearray(b"\xff" * 2 * OTADATA_ENTRY_LEN)
        self._power = power

    def erase_slot(self, slot: int, length: int) -> None:
        """Erase the sectors holding the first ``length`` bytes of ``slot``, one operation per sector."""
        for start in range(0, length, SECTOR_SIZE):
            end = min(start + SECTOR_SIZE, self.slot_size)
            failed = self._power.operation(f"erase slot {slot} @{start}")
            stop = start + (end - start) // 2 if failed else end
            self.slots[slot][start:stop] = b"\xff" * (stop - start)
            if failed:
                raise PowerCut(f"during erase of slot {slot} at {start}")

    def write_slot(self, slot: int, offset: int, data: bytes) -> None:
        self._write(self.slots[slot], offset, data, f"write slot {slot} @{offset}")

    def write_otadata(self, index: int, entry: bytes) -> None:
        start = index * OTADATA_ENTRY_LEN
        self._write(self.otadata, start, b"\xff" * OTADATA_ENTRY_LEN, f"erase otadata {index}")
        self._write(self.otadata, start, entry, f"write otadata {index}")

    def _write(self, region: bytearray, offset: int, data: bytes, what: str) -> None:
        failed = self._power.operation(what)
        length = len(data) // 2 if failed else len(data)
        region[offset : offset + length] = data[:length]
        if failed:
            raise PowerCut(f"during {what}")


@dataclass(frozen=True)
class OtaEntry:
    ota_seq: int
    image_size: int
    secure_version: int

    @property
    def slot(self) -> int:
        return (self.ota_seq - 1) % 2

    def to_bytes(self) -> bytes:
        head = struct.pack("<III", self.ota_seq, self.image_size, self.secure_version)
        return head + struct.pack("<I", zlib.crc32(head))

    @classmethod
    def parse(cls, raw: bytes) -> OtaEntry | None:
        seq, size, secure_version, crc = _ENTRY.unpack(raw)
        if seq == _ERASED_SEQ or crc != zlib.crc32(raw[:12]):
            return None
        return cls(seq, size, secure_version)


@dataclass(frozen=True)
class BootState:
    """What the device would boot: compare two of these to check that nothing that matters changed."""

    running_slot: int
    running_slot_sha256: bytes
    otadata_entry: bytes
    floor: int


@dataclass(frozen=True)
class UpdateResult:
    verdict: Verdict
    detail: str
    manifest: DecodedManifest | None


@dataclass(frozen=True)
class RolloverResult:
    """``verdict`` OK: every statement passed and the device now trusts ``trusted_key_ids``. Otherwise
    statement ``index`` failed, nothing changed and ``trusted_key_ids`` are those trusted before."""

    verdict: RolloverVerdict
    detail: str
    index: int | None
    trusted_key_ids: frozenset[bytes]


class _SlotWriter:
    """The decoder's sink: erase the inactive slot, then write each authenticated segment into it."""

    def __init__(self, flash: Flash, slot: int) -> None:
        self._flash = flash
        self._slot = slot

    def begin(self, manifest: DecodedManifest) -> None:
        if manifest.image_size > self._flash.slot_size:
            raise ImageTooLarge(f"{manifest.image_size} bytes do not fit a slot of {self._flash.slot_size}")
        self._flash.erase_slot(self._slot, manifest.image_size)

    def write(self, offset: int, plaintext: bytes) -> None:
        self._flash.write_slot(self._slot, offset, plaintext)


class DeviceModel:
    """A simulated ESP32 with eFuse secret, identity, trusted manifest keys, floor and A/B flash."""

    def __init__(
        self,
        *,
        efuse_secret: bytes,
        device_id: bytes,
        chip_id: int,
        manifest_keys_der: Sequence[bytes],
        floor: int,
        slot_size: int = 64 * 1024,
        factory_image: bytes = b"factory app",
        product: bytes = b"",
    ) -> None:
        """``product`` is the product name the firmware was built for (rollover statements name it)."""
        if len(efuse_secret) != 32:
            raise ValueError("the eFuse secret is 32 bytes")
        keys: dict[bytes, ec.EllipticCurvePublicKey] = {}
        for der in manifest_keys_der:
            key = serialization.load_der_public_key(der)
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
                raise ValueError("manifest keys are ECDSA P-256 keys")
            keys[manifest_key_id(key)] = key
        self._device_id = device_id
        self._chip_id = chip_id
        self._product = product
        self._keys = keys
        # The secret is reachable only through this HMAC, as through the HMAC peripheral.
        self._efuse_hmac = functools.partial(hmac_sha256, bytes(efuse_secret))
        self._floor = floor
        self.power = PowerSupply()
        self.flash = Flash(slot_size, self.power)
        # Factory programming: the first app in slot 0, selected by ota_seq 1; no operations counted.
        self.flash.slots[0][: len(factory_image)] = factory_image
        entry = OtaEntry(1, len(factory_image), floor)
        self.flash.otadata[OTADATA_ENTRY_LEN : 2 * OTADATA_ENTRY_LEN] = entry.to_bytes()

    @property
    def floor(self) -> int:
        return self._floor

    @property
    def trusted_key_ids(self) -> frozenset[bytes]:
        """The ids of the manifest keys the device trusts now."""
        return frozenset(self._keys)

    def apply_key_rollover(self, statements: Sequence[bytes] | bytes) -> RolloverResult:
        """Check a chain of rollover statements (a list, or their concatenation) against the trusted keys,
        oldest first; if every one passes, store the new trusted set in one operation.

        A rejected chain changes nothing (all or nothing). ``PowerCut`` propagates: the cut write leaves the
        old set (``boot()`` then restarts with it).
        """
        if not self._product:
            raise ValueError("this device model has no product: pass product= to accept key rollovers")
        before = frozenset(self._keys)
        try:
            chain = split_statements(statements) if isinstance(statements, bytes) else list(statements)
            keys = verify_chain(chain, self._product, self._keys)
        except RolloverRejected as rejected:
            return RolloverResult(rejected.verdict, rejected.detail, rejected.index, before)
        if chain:
            if self.power.operation("write trusted manifest keys"):
                raise PowerCut("while writing the trusted manifest keys")
            self._keys = keys
        return RolloverResult(RolloverVerdict.OK, "", None, frozenset(self._keys))

    def context(self) -> DeviceContext:
        return DeviceContext(self._device_id, self._chip_id, self._floor, self._keys, self._efuse_hmac)

    def state(self) -> BootState:
        entry, raw = self._selected()
        slot = entry.slot if entry is not None else 0
        return BootState(slot, hashlib.sha256(self.flash.slots[slot]).digest(), raw, self._floor)

    def boot(self) -> BootState:
        """Restart after a power cut: power back, the selected app runs and raises the floor to its own."""
        self.power.cut_at = None
        entry, _ = self._selected()
        if entry is not None and entry.secure_version > self._floor:
            self._floor = entry.secure_version
        return self.state()

    def apply_update(self, source: Iterable[Chunk] | Chunk) -> UpdateResult:
        """Install a payload into the inactive slot and switch to it only if every check passed.

        A rejected payload gives its verdict and leaves the running slot, otadata and floor untouched.
        ``PowerCut``, ``ImageTooLarge`` and ``FlashVerifyError`` propagate.
        """
        running, _ = self._selected()
        seq = running.ota_seq if running is not None else 0
        target = 1 - (running.slot if running is not None else 0)
        try:
            manifest = decode_stream(source, self.context(), _SlotWriter(self.flash, target))
        except PayloadRejected as rejected:
            return UpdateResult(rejected.verdict, rejected.detail, None)
        written = bytes(self.flash.slots[target][: manifest.image_size])
        if hashlib.sha256(written).digest() != manifest.image_sha256:
            raise FlashVerifyError(f"slot {target} does not hold the image just written")
        new = OtaEntry(seq + 1, manifest.image_size, manifest.secure_version)
        self.flash.write_otadata(new.ota_seq % 2, new.to_bytes())
        self._burn_floor(manifest.secure_version)
        return UpdateResult(Verdict.OK, "", manifest)

    def running_image(self) -> bytes:
        """The bytes of the running app (as long as its otadata entry says)."""
        entry, _ = self._selected()
        if entry is None:
            return bytes(self.flash.slots[0])
        return bytes(self.flash.slots[entry.slot][: entry.image_size])

    def _burn_floor(self, secure_version: int) -> None:
        if secure_version <= self._floor:
            return
        if self.power.operation(f"burn secure_version {secure_version}"):
            raise PowerCut("during the eFuse burn")
        self._floor = secure_version

    def _selected(self) -> tuple[OtaEntry | None, bytes]:
        best: tuple[OtaEntry | None, bytes] = (None, b"")
        for index in range(2):
            raw = bytes(self.flash.otadata[index * OTADATA_ENTRY_LEN : (index + 1) * OTADATA_ENTRY_LEN])
            entry = OtaEntry.parse(raw)
            if entry is not None and (best[0] is None or entry.ota_seq > best[0].ota_seq):
                best = (entry, raw)
        return best


def cut_stream(payload: bytes, at: int, chunk: int = 1000) -> Iterator[bytes]:
    """Deliver the first ``at`` bytes of ``payload`` in chunks, then fail the power (raise ``PowerCut``)."""
    for start in range(0, at, chunk):
        yield payload[start : min(start + chunk, at)]
    raise PowerCut(f"after {at} input bytes")
