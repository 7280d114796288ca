"""The values the client library returns: plain frozen dataclasses and enums, no gRPC and no I/O.

Enum values are the lowercase names the service uses in its configuration and CLI (``"ecdsa-p256"``); a
value the server sends that this client does not know (a newer server) maps to ``UNSPECIFIED`` rather than
failing the whole call.
"""

from __future__ import annotations

import enum
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
