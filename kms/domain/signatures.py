"""Signature encodings and verification.

The HSM port returns RAW signatures (``Hsm.sign_digest``); callers ask for an encoding:

- RAW, ECDSA: ``r || s``, each big-endian, left-padded with zeros to the curve size (32 bytes for P-256,
  48 for P-384).
- RAW, RSA-PSS: the signature as a big-endian integer of the modulus length (384 bytes for RSA-3072).
- DER, ECDSA only: ``SEQUENCE { r INTEGER, s INTEGER }`` (RFC 3279 Ecdsa-Sig-Value), what openssl expects.

The service verifies every signature with the public key before it leaves (a guard against HSM faults and
fault attacks, as Google Cloud KMS recommends to its clients); a failed check is an ``HsmFailure``.
"""

from __future__ import annotations

import enum
import functools

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from kms.domain.errors import HsmFailure, InvalidArgument
from kms.domain.keys import Algorithm, HashAlgorithm

PSS_SALT_LENGTH = 32


class SignatureEncoding(enum.Enum):
    RAW = "raw"
    DER = "der"


def _hash(algorithm: Algorithm) -> hashes.HashAlgorithm:
    return hashes.SHA384() if algorithm.hash is HashAlgorithm.SHA384 else hashes.SHA256()


def encode(algorithm: Algorithm, raw: bytes, encoding: SignatureEncoding) -> bytes:
    """Re-encode a RAW signature. DER exists for ECDSA only."""
    if encoding is SignatureEncoding.RAW:
        return raw
    if not algorithm.is_ecdsa:
        raise InvalidArgument(f"DER encoding exists for ECDSA signatures only; key is {algorithm.value}")
    half = len(raw) // 2
    r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    return utils.encode_dss_signature(r, s)


@functools.lru_cache(maxsize=256)
def _public_key(public_key_der: bytes) -> PublicKeyTypes:
    """Parsed public keys, cached: parsing costs as much as verifying, and keys are few."""
    return serialization.load_der_public_key(public_key_der)


def verify_raw(algorithm: Algorithm, public_key_der: bytes, digest: bytes, raw: bytes) -> bool:
    """True if ``raw`` is a valid signature of the pre-computed ``digest`` under the public key."""
    key = _public_key(public_key_der)
    prehashed = utils.Prehashed(_hash(algorithm))
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if len(raw) != algorithm.raw_signature_size:
                return False
            half = len(raw) // 2
            der = utils.encode_dss_signature(
                int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
            )
            key.verify(der, digest, ec.ECDSA(prehashed))
        elif isinstance(key, rsa.RSAPublicKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH)
            key.verify(raw, digest, pss, prehashed)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def check_signature(algorithm: Algorithm, public_key_der: bytes, digest: bytes, raw: bytes) -> None:
    """Raise ``HsmFailure`` unless the HSM's signature verifies (never release a faulty signature)."""
    if not verify_raw(algorithm, public_key_der, digest, raw):
        raise HsmFailure("the HSM returned a signature that does not verify; nothing was released")
