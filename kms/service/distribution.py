"""Per-device payloads of signed releases, for distribution servers.

Two formats:

- ``FKSP_V1`` (docs/sealed-payload-v1.md): the payload key is one HMAC-SHA256 keyed by the device's eFuse
  secret, computed inside the HSM (the secret is unwrapped from the KEK into a session object); the manifest
  is signed once per (device, release, segment size) by the product's OTA manifest key and the signature is
  stored, so every request for the same payload returns the same bytes.
- ``ESP_ENCRYPTED_IMG`` (Espressif's esp_encrypted_img, ECIES-P256): the ephemeral key, salt and IV are
  derived from a seed that the product's payload-seed HMAC key (in the HSM) computes over (device id, image
  SHA-256), so this format is deterministic and resumable too.

Each request reads the release's image through a read-only memory map shared by all requests of the process
(hashed once per process and checked against the release name), and encrypts only the segments it streams.
Every payload key derivation and manifest signature is recorded as a key use of the caller.
"""

from __future__ import annotations

import enum
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from kms.domain import chips, esp_encrypted_img, sealed, signatures
from kms.domain.devices import Device, DeviceState, validate_device_id
from kms.domain.errors import DataLoss, FailedPrecondition, InvalidArgument
from kms.domain.identity import Caller
from kms.domain.keys import KeyPurpose
from kms.domain.policy import require_product
from kms.domain.ports import (
    DeviceRepository,
    Hsm,
    ImageSource,
    KeyRepository,
    ReleaseRepository,
    SignatureLog,
)
from kms.domain.releases import Release, SignatureRecord
from kms.service.registry import kek_hsm_id, primary_key_of

DEFAULT_SEGMENT_SIZE = 4096
IMAGE_CACHE_ENTRIES = 8


class PayloadFormat(enum.Enum):
    FKSP_V1 = "fksp-v1"
    ESP_ENCRYPTED_IMG = "esp-encrypted-img"


@dataclass(frozen=True)
class Payload:
    format: PayloadFormat
    device: Device
    release: Release
    total_size: int
    segment_size: int
    manifest_key_version: str
    _stream: Callable[[int, int], Iterator[bytes]]

    def iter_bytes(self, offset: int, chunk: int) -> Iterator[bytes]:
        """The payload from ``offset`` to its end; ``OutOfRange`` past the end."""
        return self._stream(offset, chunk)


def parse_release_name(name: str) -> bytes:
    prefix = "releases/"
    digest = name.removeprefix(prefix)
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        raw = b""
    if not name.startswith(prefix) or len(raw) != 32:
        raise InvalidArgument(f"malformed release name {name!r}: expected 'releases/' and 64 hex digits")
    return raw


class _ImageCache:
    """Verified images by release digest: one SHA-256 pass per release per process, bounded entries."""

    def __init__(self, source: ImageSource, entries: int) -> None:
        self._source = source
        self._entries = entries
        self._lock = threading.Lock()
        self._images: OrderedDict[bytes, sealed.HashedImage] = OrderedDict()

    def get(self, output_sha256: bytes) -> sealed.HashedImage:
        with self._lock:
            image = self._images.get(output_sha256)
            if image is not None:
                self._images.move_to_end(output_sha256)
                return image
        image = sealed.HashedImage(self._source.image_view(output_sha256))
        if image.sha256 != output_sha256:
            raise DataLoss("the stored image of this release is corrupted; it was not sent")
        with self._lock:
            self._images[output_sha256] = image
            while len(self._images) > self._entries:
                self._images.popitem(last=False)
        return image


class Distribution:
    def __init__(
        self,
        hsm: Hsm,
        keys: KeyRepository,
        devices: DeviceRepository,
        releases: ReleaseRepository,
        images: ImageSource,
        signature_log: SignatureLog,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._hsm = hsm
        self._keys = keys
        self._devices = devices
        self._releases = releases
        self._images = _ImageCache(images, IMAGE_CACHE_ENTRIES)
        self._log = signature_log
        self._clock = clock

    def payload(
        self,
        caller: Caller,
        device_id: str,
        release_name: str,
        payload_format: PayloadFormat,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        device_secure_version: int | None = None,
    ) -> Payload:
        device = self._devices.get(validate_device_id(device_id))
        require_product(caller, device.product)
        release = self._releases.get(parse_release_name(release_name))
        self._check(device, release, device_secure_version)
        if payload_format is PayloadFormat.FKSP_V1:
            return self._fksp(caller, device, release, segment_size)
        return self._esp_encrypted_img(caller, device, release)

    @staticmethod
    def _check(device: Device, release: Release, device_secure_version: int | None) -> None:
        if device.state is not DeviceState.ACTIVE:
            raise FailedPrecondition(f"device {device.device_id!r} is revoked; it gets no payload")
        if device.product != release.product:
            raise FailedPrecondition(
                f"{release.name} is a release of product {release.product!r}; device {device.device_id!r} "
                f"belongs to {device.product!r}"
            )
        if device.chip != release.chip:
            raise FailedPrecondition(
                f"{release.name} is built for {release.chip}; device {device.device_id!r} is an {device.chip}"
            )
        if device_secure_version is not None and device_secure_version > release.secure_version:
            raise FailedPrecondition(
                f"anti-rollback: the device runs secure_version {device_secure_version}, above the release's "
                f"{release.secure_version}; it would refuse this image"
            )

    def _fksp(self, caller: Caller, device: Device, release: Release, segment_size: int) -> Payload:
        _key, manifest_key = primary_key_of(self._keys, device.product, KeyPurpose.OTA_MANIFEST)
        header = sealed.SealedHeader(
            segment_size=segment_size,
            image_size=release.output_size,
            manifest_key_id=hashlib.sha256(manifest_key.public_key_der).digest(),
        )
        manifest = sealed.Manifest(
            image_sha256=release.output_sha256,
            image_size=release.output_size,
            secure_version=release.secure_version,
            chip_id=chips.chip_by_name(release.chip).chip_id,
            device_id=device.device_id,
            product=release.product,
            version=release.version,
            release_time=int(release.created_at.timestamp()),
        )
        prefix = sealed.signed_bytes(header, manifest)
        now = self._clock()
        signature = self._devices.payload_signature(
            device.device_id, release.output_sha256, segment_size, manifest_key.name
        )
        records = []
        try:  # every HSM use is recorded, also when a later step fails (the finally below)
            if signature is None:
                digest = hashlib.sha256(prefix).digest()
                raw = self._hsm.sign_digest(manifest_key.hsm_id, manifest_key.algorithm, digest)
                records.append(
                    SignatureRecord(
                        caller.identity,
                        "sign-manifest",
                        manifest_key.name,
                        digest,
                        f"{release.name}@{device.device_id}",
                        now,
                    )
                )
                signatures.check_signature(manifest_key.algorithm, manifest_key.public_key_der, digest, raw)
                signature = self._devices.save_payload_signature(
                    device.device_id, release.output_sha256, segment_size, manifest_key.name, raw, now
                )
            info = sealed.key_derivation_info(manifest, prefix)
            payload_key = self._hsm.hmac_with_wrapped_secret(
                kek_hsm_id(self._keys, device), device.secret.blob, info + b"\x01"
            )
            kek_name = f"keys/{device.secret.kek_key_id}/versions/{device.secret.kek_version}"
            records.append(
                SignatureRecord(
                    caller.identity,
                    "derive-payload-key",
                    kek_name,
                    hashlib.sha256(info).digest(),
                    f"{release.name}@{device.device_id}",
                    now,
                )
            )
        finally:
            for record in records:
                self._log.append(record)
        payload = sealed.SealedPayload(
            header, manifest, signature, payload_key, self._images.get(release.output_sha256)
        )
        return Payload(
            PayloadFormat.FKSP_V1,
            device,
            release,
            payload.total_size(),
            segment_size,
            manifest_key.name,
            payload.iter_bytes,
        )

    def _esp_encrypted_img(self, caller: Caller, device: Device, release: Release) -> Payload:
        if device.ecies_public_key is None:
            raise FailedPrecondition(
                f"device {device.device_id!r} was registered without an esp_encrypted_img public key; "
                "register it again with ecies_public_key to use this format"
            )
        _key, seed_key = primary_key_of(self._keys, device.product, KeyPurpose.PAYLOAD_SEED)
        message = esp_encrypted_img.seed_message(device.device_id, release.output_sha256)
        seed = self._hsm.hmac(seed_key.hsm_id, message)
        now = self._clock()
        self._log.append(
            SignatureRecord(
                caller.identity,
                "derive-payload-seed",
                seed_key.name,
                hashlib.sha256(message).digest(),
                f"{release.name}@{device.device_id}",
                now,
            )
        )
        image = self._images.get(release.output_sha256)
        payload = esp_encrypted_img.EspEncryptedImage.for_device(
            image.data, b"\x04" + device.ecies_public_key, seed
        )
        return Payload(
            PayloadFormat.ESP_ENCRYPTED_IMG, device, release, payload.total_size(), 0, "", payload.iter_bytes
        )
