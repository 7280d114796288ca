"""The Secure Boot V2 eFuse key digest, computed from a public key alone.

The digest burned into a ``SECURE_BOOT_DIGESTn`` eFuse is SHA-256 over the public-key part of a signature
block, laid out exactly as in the block (all integers little-endian):

RSA-3072 (block bytes 36..811, 776 bytes)::

    n              384 bytes   the modulus
    e                4 bytes   the public exponent
    R              384 bytes   2^6144 mod n (Montgomery constant for the ROM's RSA peripheral)
    M'               4 bytes   -n^-1 mod 2^32

ECDSA P-256 (block bytes 36..100, 65 bytes) and P-384 (block bytes 52..148, 97 bytes)::

    curve id         1 byte    2 for P-256, 3 for P-384
    X, Y      2 x 32/48 bytes  the public point

The client recomputes it so that a wrong value from the server (which would make devices refuse every
firmware once burned) is caught before anyone burns it. ``tests/unit/test_client_sbv2.py`` checks it against
``espsecure digest-sbv2-public-key``.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kmsctl._models import Algorithm

_RSA_BITS = 3072
_CURVES: dict[str, tuple[Algorithm, int, int]] = {
    # curve name: (algorithm, curve id in the signature block, coordinate size in bytes)
    ec.SECP256R1.name: (Algorithm.ECDSA_P256_SHA256, 2, 32),
    ec.SECP384R1.name: (Algorithm.ECDSA_P384_SHA384, 3, 48),
}


def describe_public_key(pem: str | bytes) -> tuple[Algorithm, bytes]:
    """Return the SBv2 algorithm of a PEM SubjectPublicKeyInfo and its 32-byte eFuse key digest.

    Raises ``ValueError`` for a key that is not RSA-3072, P-256 or P-384, or PEM that does not parse.
    """
    key = serialization.load_pem_public_key(pem.encode("ascii") if isinstance(pem, str) else pem)
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size != _RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; Secure Boot V2 uses {_RSA_BITS}")
        numbers = key.public_numbers()
        n, e = numbers.n, numbers.e
        size = _RSA_BITS // 8
        montgomery_r = pow(2, 2 * _RSA_BITS, n)
        m_prime = -pow(n, -1, 1 << 32) % (1 << 32)
        block = (
            n.to_bytes(size, "little")
            + e.to_bytes(4, "little")
            + montgomery_r.to_bytes(size, "little")
            + m_prime.to_bytes(4, "little")
        )
        return Algorithm.RSA_3072_PSS_SHA256, hashlib.sha256(block).digest()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        algorithm, curve_id, size = _CURVES[key.curve.name]
        point = key.public_numbers()
        block = bytes([curve_id]) + point.x.to_bytes(size, "little") + point.y.to_bytes(size, "little")
        return algorithm, hashlib.sha256(block).digest()
    raise ValueError("not an RSA-3072, ECDSA P-256 or ECDSA P-384 public key")


def sbv2_key_digest(pem: str | bytes) -> bytes:
    """The 32-byte Secure Boot V2 eFuse key digest of a PEM public key (see the module docstring)."""
    return describe_public_key(pem)[1]
