"""Signing keys, their versions and their resource names.

A *key* belongs to a product and has a purpose; it has numbered *versions*, each a distinct key pair held in
the HSM. The HSM identifies a version's private key by an opaque ``hsm_id`` (the PKCS#11 ``CKA_ID``); the
domain never sees private material, only the public key (DER SubjectPublicKeyInfo).
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kms.domain.errors import InvalidArgument

KEY_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
PRODUCT_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_KEY_NAME = re.compile(r"keys/(?P<key>[^/]+)(?:/versions/(?P<version>[1-9][0-9]{0,8}))?")


class HashAlgorithm(enum.Enum):
    SHA256 = "sha256"
    SHA384 = "sha384"

    @property
    def size(self) -> int:
        return 32 if self is HashAlgorithm.SHA256 else 48

    def digest(self, data: bytes) -> bytes:
        return hashlib.new(self.value, data).digest()


class Algorithm(enum.Enum):
    """Signing algorithms. The value is the name used in configuration, the CLI and the database."""

    ECDSA_P256_SHA256 = "ecdsa-p256"
    ECDSA_P384_SHA384 = "ecdsa-p384"
    RSA_3072_PSS_SHA256 = "rsa3072-pss"
    # Not for signatures: the KEK, the registration transport key, the payload-seed HMAC key.
    AES_256 = "aes256"
    RSA_3072_OAEP_SHA256 = "rsa3072-oaep"
    HMAC_SHA256 = "hmac-sha256"

    @property
    def is_signing(self) -> bool:
        return self in _SIGNING

    @property
    def hash(self) -> HashAlgorithm:
        return HashAlgorithm.SHA384 if self is Algorithm.ECDSA_P384_SHA384 else HashAlgorithm.SHA256

    @property
    def is_ecdsa(self) -> bool:
        return self in (Algorithm.ECDSA_P256_SHA256, Algorithm.ECDSA_P384_SHA384)

    @property
    def raw_signature_size(self) -> int:
        """Bytes of a RAW signature: r||s for ECDSA, the modulus length for RSA."""
        return {Algorithm.ECDSA_P256_SHA256: 64, Algorithm.ECDSA_P384_SHA384: 96}.get(self, 384)

    @classmethod
    def parse(cls, text: str) -> Algorithm:
        for algorithm in cls:
            if algorithm.value == text:
                return algorithm
        choices = ", ".join(a.value for a in cls)
        raise InvalidArgument(f"unknown algorithm {text!r}; expected one of: {choices}")

    def check_public_key(self, public_key_der: bytes) -> None:
        """Raise ``InvalidArgument`` unless the DER public key is of this algorithm."""
        key = serialization.load_der_public_key(public_key_der)
        if self in (Algorithm.RSA_3072_PSS_SHA256, Algorithm.RSA_3072_OAEP_SHA256):
            ok = isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
        elif not self.is_ecdsa:
            raise InvalidArgument(f"{self.value} keys have no public key")
        else:
            curve = ec.SECP256R1 if self is Algorithm.ECDSA_P256_SHA256 else ec.SECP384R1
            ok = isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, curve)
        if not ok:
            raise InvalidArgument(f"public key is not a {self.value} key")


_SIGNING = frozenset(
    {Algorithm.ECDSA_P256_SHA256, Algorithm.ECDSA_P384_SHA384, Algorithm.RSA_3072_PSS_SHA256}
)


class KeyPurpose(enum.Enum):
    SECURE_BOOT_V2 = "secure-boot-v2"
    DIGEST_SIGNING = "digest-signing"
    OTA_MANIFEST = "ota-manifest"  # signs sealed-payload manifests (ECDSA P-256)
    KEY_ENCRYPTION = "key-encryption"  # the product's KEK: wraps device secrets (AES-256, KWP)
    REGISTRATION_TRANSPORT = "registration-transport"  # factories wrap batch keys to it (RSA-3072 OAEP)
    PAYLOAD_SEED = "payload-seed"  # HMAC key deriving deterministic esp_encrypted_img ephemerals
    AUDIT_CHECKPOINT = "audit-checkpoint"  # signs audit log checkpoints (ECDSA P-256), product "kms"

    @property
    def algorithms(self) -> frozenset[Algorithm]:
        """The algorithms a key of this purpose may have."""
        return _PURPOSE_ALGORITHMS[self]


_PURPOSE_ALGORITHMS = {
    KeyPurpose.SECURE_BOOT_V2: _SIGNING,
    KeyPurpose.DIGEST_SIGNING: _SIGNING,
    KeyPurpose.OTA_MANIFEST: frozenset({Algorithm.ECDSA_P256_SHA256}),
    KeyPurpose.KEY_ENCRYPTION: frozenset({Algorithm.AES_256}),
    KeyPurpose.REGISTRATION_TRANSPORT: frozenset({Algorithm.RSA_3072_OAEP_SHA256}),
    KeyPurpose.PAYLOAD_SEED: frozenset({Algorithm.HMAC_SHA256}),
    KeyPurpose.AUDIT_CHECKPOINT: frozenset({Algorithm.ECDSA_P256_SHA256}),
}

SYSTEM_PRODUCT = "kms"
"""The product name of the service's own keys (the audit checkpoint key)."""


class KeyVersionState(enum.Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTROY_SCHEDULED = "destroy-scheduled"
    DESTROYED = "destroyed"


@dataclass(frozen=True)
class KeyName:
    """A parsed ``keys/{key_id}`` or ``keys/{key_id}/versions/{n}`` name."""

    key_id: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> KeyName:
        match = _KEY_NAME.fullmatch(text)
        if match is None or not KEY_ID_PATTERN.fullmatch(match["key"]):
            raise InvalidArgument(
                f"malformed key name {text!r}: expected 'keys/KEY_ID' or 'keys/KEY_ID/versions/N' "
                "with KEY_ID of lowercase letters, digits and dashes"
            )
        version = match["version"]
        return cls(match["key"], int(version) if version else None)

    def __str__(self) -> str:
        base = f"keys/{self.key_id}"
        return base if self.version is None else f"{base}/versions/{self.version}"


@dataclass(frozen=True)
class KeyVersion:
    """One key pair of a key. ``hsm_id`` names its private half inside the HSM (opaque to the domain)."""

    key_id: str
    version: int
    algorithm: Algorithm
    state: KeyVersionState
    hsm_id: bytes
    public_key_der: bytes = field(repr=False)
    created_at: datetime

    @property
    def name(self) -> str:
        return str(KeyName(self.key_id, self.version))

    @property
    def public_key_pem(self) -> str:
        key = serialization.load_der_public_key(self.public_key_der)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")


@dataclass(frozen=True)
class Key:
    """A named key of a product. ``sbv2_slot`` is the Secure Boot V2 block slot (0-2), or None."""

    key_id: str
    product: str
    purpose: KeyPurpose
    algorithm: Algorithm
    sbv2_slot: int | None
    primary_version: int
    versions: tuple[KeyVersion, ...]
    created_at: datetime

    @property
    def name(self) -> str:
        return str(KeyName(self.key_id))

    def version(self, number: int | None = None) -> KeyVersion:
        """The given version, or the primary one. Raises ``LookupError`` if there is no such version."""
        wanted = self.primary_version if number is None else number
        for candidate in self.versions:
            if candidate.version == wanted:
                return candidate
        raise LookupError(wanted)


def validate_product(product: str) -> str:
    if not PRODUCT_PATTERN.fullmatch(product):
        raise InvalidArgument(
            f"malformed product name {product!r}: use 1-63 lowercase letters, digits, '.', '_' or '-'"
        )
    return product
