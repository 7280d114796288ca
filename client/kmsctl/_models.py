"""The values the client library returns: plain frozen dataclasses and enums, no gRPC and no I/O.

Enum values are the lowercase names the service uses in its configuration and CLI (``"ecdsa-p256"``); a
value the server sends that this client does not know (a newer server) maps to ``UNSPECIFIED`` rather than
failing the whole call.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

HashName = Literal["sha256", "sha384"]
EncodingName = Literal["raw", "der"]
#: ``progress(bytes_sent, image_size)``, called from a gRPC thread as upload chunks are handed over.
ProgressCallback = Callable[[int, int], None]


class Algorithm(enum.Enum):
    """A key's signature algorithm; each has exactly one hash."""

    UNSPECIFIED = "unspecified"
    ECDSA_P256_SHA256 = "ecdsa-p256"
    ECDSA_P384_SHA384 = "ecdsa-p384"
    RSA_3072_PSS_SHA256 = "rsa3072-pss"

    @property
    def hash(self) -> HashName:
        """The hash a digest signed with this algorithm must use."""
        return "sha384" if self is Algorithm.ECDSA_P384_SHA384 else "sha256"


class KeyPurpose(enum.Enum):
    UNSPECIFIED = "unspecified"
    SECURE_BOOT_V2 = "secure-boot-v2"
    DIGEST_SIGNING = "digest-signing"


class KeyVersionState(enum.Enum):
    UNSPECIFIED = "unspecified"
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTROY_SCHEDULED = "destroy-scheduled"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class Release:
    """A signed image as the service recorded it. Digests are raw bytes; ``name`` is ``releases/{hex}``."""

    name: str
    product: str
    chip: str
    version: str
    secure_version: int
    project_name: str
    input_sha256: bytes
    output_sha256: bytes
    output_size: int
    key_versions: tuple[str, ...]
    signed_by: str
    create_time: datetime | None
    reused: bool


@dataclass(frozen=True)
class SignedImage:
    """The result of ``KmsClient.sign_image``, checked against ``release.output_size`` and ``output_sha256``.

    Exactly one of ``data`` (the signed image in memory) and ``path`` (the file it was written to, when the
    call was given ``output=``) is set.
    """

    release: Release
    data: bytes | None = field(repr=False)
    path: Path | None


@dataclass(frozen=True)
class DigestSignature:
    """A signature over a caller's digest, checked with CRC32C in both directions."""

    signature: bytes
    key_version: str
    algorithm: Algorithm
    encoding: EncodingName


@dataclass(frozen=True)
class PublicKeyInfo:
    """A key version's public key (PEM, CRC32C-checked) and its Secure Boot V2 eFuse key digest.

    ``sbv2_key_digest`` is the 32 bytes to burn into a SECURE_BOOT_DIGESTn eFuse. The client computes it
    from ``pem`` itself and refuses a server value that differs.
    """

    key_version: str
    algorithm: Algorithm
    pem: str
    sbv2_key_digest: bytes


@dataclass(frozen=True)
class KeyVersionInfo:
    name: str
    state: KeyVersionState
    create_time: datetime | None


@dataclass(frozen=True)
class KeyInfo:
    """A key and its versions. ``sbv2_slot`` is the signature-block slot (0-2), or None."""

    name: str
    product: str
    purpose: KeyPurpose
    algorithm: Algorithm
    sbv2_slot: int | None
    primary_version: str
    versions: tuple[KeyVersionInfo, ...]


# -- devices and payloads ----------------------------------------------------------------------------------

TransportName = Literal["wrapped", "plain"]
PayloadFormatName = Literal["fksp", "esp-encrypted-img"]
#: ``progress(rows_done, rows_total)``: rows the server has acknowledged, of ``len(rows)`` when the rows
#: are a sized collection, else of ``None``.
RowProgressCallback = Callable[[int, int | None], None]

SECRET_SIZE = 32
_DEVICE_ID = re.compile(r"[\x21-\x7e]{1,64}")
_CHIP = re.compile(r"[a-z0-9]{1,32}")


@dataclass(frozen=True)
class RegistrationKeyInfo:
    """A product's registration transport key: RSA-3072 (OAEP) that registration batch keys are encrypted
    to; ``pem`` is its SubjectPublicKeyInfo."""

    key_version: str
    pem: str


@dataclass(frozen=True)
class DeviceRegistration:
    """One device to register: its id, chip, 32-byte eFuse secret and, optionally, its esp_encrypted_img
    ECIES public key (X||Y, 64 bytes, or SEC1 uncompressed, 65).

    ``row`` is the row number reported back with the outcome (e.g. the line in the caller's input file);
    ``None`` numbers the row by its 1-based position among the rows given to ``register_devices``.
    Construction checks what the client can check (``ValueError`` with a readable message); the server
    checks again.
    """

    device_id: str
    chip: str
    secret: bytes = field(repr=False)
    ecies_public_key: bytes | None = None
    row: int | None = None

    def __post_init__(self) -> None:
        if not _DEVICE_ID.fullmatch(self.device_id):
            raise ValueError(
                f"malformed device id {self.device_id[:80]!r}: use 1-64 printable ASCII characters, no spaces"
            )
        if not _CHIP.fullmatch(self.chip):
            raise ValueError(f"malformed chip {self.chip[:40]!r}: use the name esptool prints, e.g. esp32s3")
        if not isinstance(self.secret, bytes | bytearray) or len(self.secret) != SECRET_SIZE:
            raise ValueError(f"the eFuse secret is {SECRET_SIZE} bytes, not {len(self.secret)}")
        if self.ecies_public_key is not None:
            _check_ecies_public_key(self.ecies_public_key)
        if self.row is not None and self.row < 0:
            raise ValueError("row numbers are not negative")


def _check_ecies_public_key(key: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if len(key) == 64:
        point = b"\x04" + key
    elif len(key) == 65 and key[0] == 4:
        point = key
    else:
        raise ValueError(
            f"an ECIES public key is X||Y (64 bytes) or 04||X||Y (65 bytes), not {len(key)} bytes"
        )
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise ValueError("the ECIES public key is not a point on P-256") from None


class RegistrationStatus(enum.Enum):
    UNSPECIFIED = "unspecified"
    CREATED = "created"
    UNCHANGED = "unchanged"  # already registered with the same secret: a no-op
    REJECTED = "rejected"
    REPROVISIONED = "reprovisioned"  # officers opened the device: this secret replaced the stored one


@dataclass(frozen=True)
class RowOutcome:
    """What the server did with one row. For a rejected row, ``code`` is the status name
    (``"INVALID_ARGUMENT"``, ``"ALREADY_EXISTS"`` for a device registered with another secret, ...) and
    ``message`` says why; both are empty otherwise."""

    row: int
    device_id: str
    status: RegistrationStatus
    code: str = ""
    message: str = ""


#: ``on_outcome(outcome)``: called once per row, in row order, as acknowledgements arrive.
RowOutcomeCallback = Callable[[RowOutcome], None]


@dataclass(frozen=True)
class RegistrationSummary:
    """The outcome of ``register_devices``: counts, and every rejected row in row order.
    ``transport_key_version`` is the registration key the secrets were wrapped to ("" for plain)."""

    created: int
    unchanged: int
    rejected: list[RowOutcome]
    transport_key_version: str = ""
    reprovisioned: int = 0

    @property
    def total(self) -> int:
        return self.created + self.unchanged + self.reprovisioned + len(self.rejected)


class DeviceState(enum.Enum):
    UNSPECIFIED = "unspecified"
    ACTIVE = "active"
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceInfo:
    """A registered device as the registry describes it (never its secret)."""

    device_id: str
    product: str
    chip: str
    state: DeviceState
    kek_version: str
    has_ecies_public_key: bool
    registered_by: str
    register_time: datetime | None
    secret_generation: int = 1  # +1 per re-provisioning
    reprovision_until: datetime | None = None  # open for re-provisioning until then
    # Who registered the current secret and when (generation 1: the registration above; the registration
    # fields always name the first one), and the approval request, "approvals/ID", that admitted it.
    secret_registered_by: str = ""
    secret_register_time: datetime | None = None
    reprovisioned_under: str = ""  # empty for generation 1


class PayloadFormat(enum.Enum):
    UNSPECIFIED = "unspecified"
    FKSP_V1 = "fksp"
    ESP_ENCRYPTED_IMG_ECIES = "esp-encrypted-img"


@dataclass(frozen=True)
class PayloadInfo:
    """A payload as the server announced it. ``total_size`` is the size of the whole payload."""

    format: PayloadFormat
    total_size: int
    device_id: str
    release: str
    secure_version: int
    segment_size: int
    manifest_key_version: str


@dataclass(frozen=True)
class PayloadDownload:
    """The result of ``KmsClient.get_payload``: exactly one of ``data`` (bytes ``[start_offset,
    info.total_size)``, in memory) and ``path`` (the complete payload, when the call was given ``output=``)
    is set. ``start_offset`` is where this call started: the ``offset`` argument, or the size of the
    ``.part`` file it resumed. ``resumes`` counts the broken streams it resumed on the way."""

    info: PayloadInfo
    data: bytes | None = field(repr=False)
    path: Path | None
    start_offset: int = 0
    resumes: int = 0
