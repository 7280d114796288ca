"""What a key looks like inside the HSM: generation templates, signing mechanisms, public key encoding.

Pure functions over python-pkcs11's constants; nothing here calls the PKCS#11 module.

Every key pair the service generates gets these attributes (PKCS#11 2.40 names):

=====================  ===============================  ==================================
Attribute              Private key                      Public key
=====================  ===============================  ==================================
CKA_TOKEN              true (persists in the token)     true
CKA_PRIVATE            true (needs login to use)        false
CKA_SENSITIVE          true (value never readable)      -
CKA_EXTRACTABLE        false (cannot be wrapped out)    -
CKA_SIGN / CKA_VERIFY  SIGN true                        VERIFY true
CKA_DECRYPT, _UNWRAP,  false                            ENCRYPT, WRAP false
CKA_DERIVE
CKA_ID                 16 random bytes, the same on both halves: the ``hsm_id``
CKA_LABEL              informative (the caller's label)
=====================  ===============================  ==================================

EC keys use named curves (CKA_EC_PARAMS is the DER OID); RSA keys have a 3072-bit modulus and public
exponent 65537. Signing mechanisms are always given explicitly, never python-pkcs11's defaults (which are
ECDSA_SHA512 for EC keys and SHA-1/MGF1-SHA1/salt 20 for RSA-PSS):

- ECDSA P-256 / P-384: ``CKM_ECDSA`` over the digest the caller computed (SHA-256 / SHA-384); the result
  is r||s, big-endian, each half the curve size (64 / 96 bytes).
- RSA-3072-PSS: ``CKM_RSA_PKCS_PSS`` over the SHA-256 digest with ``CK_RSA_PKCS_PSS_PARAMS`` = (SHA-256,
  MGF1-SHA-256, salt length 32); the result is the 384-byte big-endian signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from kms.domain.errors import HsmFailure
from kms.domain.keys import Algorithm

HSM_ID_BYTES = 16
RSA_BITS = 3072
RSA_PUBLIC_EXPONENT = 65537

# DER encodings of the named-curve OIDs, as CKA_EC_PARAMS holds them.
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # 1.2.840.10045.3.1.7 (prime256v1, secp256r1)
P384_PARAMS = bytes.fromhex("06052b81040022")  # 1.3.132.0.34 (secp384r1)

_CURVES: dict[Algorithm, tuple[bytes, ec.EllipticCurve]] = {
    Algorithm.ECDSA_P256_SHA256: (P256_PARAMS, ec.SECP256R1()),
    Algorithm.ECDSA_P384_SHA384: (P384_PARAMS, ec.SECP384R1()),
}

RSA_ALGORITHMS = (Algorithm.RSA_3072_PSS_SHA256, Algorithm.RSA_3072_OAEP_SHA256)
SECRET_KEY_BYTES = 32

SIGN_AND_VERIFY = MechanismFlag.SIGN | MechanismFlag.VERIFY


@dataclass(frozen=True)
class KeySpec:
    """How to generate a key pair of one algorithm."""

    key_type: KeyType
    mechanism: Mechanism
    key_length: int | None
    public_template: dict[Attribute, Any]


def key_spec(algorithm: Algorithm) -> KeySpec:
    """The generation recipe of a signing key pair (ECDSA P-256/P-384, RSA-3072-PSS)."""
    if not algorithm.is_signing:
        raise ValueError(f"{algorithm.value} is not a signing algorithm")
    if algorithm is Algorithm.RSA_3072_PSS_SHA256:
        exponent = RSA_PUBLIC_EXPONENT.to_bytes(3, "big")
        public = {Attribute.MODULUS_BITS: RSA_BITS, Attribute.PUBLIC_EXPONENT: exponent}
        return KeySpec(KeyType.RSA, Mechanism.RSA_PKCS_KEY_PAIR_GEN, RSA_BITS, _public_base() | public)
    params, _ = _CURVES[algorithm]
    public = {Attribute.EC_PARAMS: params}
    return KeySpec(KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, None, _public_base() | public)


def _public_base() -> dict[Attribute, Any]:
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
    }


def private_template() -> dict[Attribute, Any]:
    """The private half's protection (the table in the module docstring)."""
    return {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }


def sign_parameters(algorithm: Algorithm) -> dict[str, Any]:
    """Keyword arguments for python-pkcs11's ``sign()``: the mechanism and its parameters, explicitly."""
    if algorithm is Algorithm.RSA_3072_PSS_SHA256:
        salt_length = algorithm.hash.size  # 32
        return {
            "mechanism": Mechanism.RSA_PKCS_PSS,
            "mechanism_param": (Mechanism.SHA256, MGF.SHA256, salt_length),
        }
    return {"mechanism": Mechanism.ECDSA}


def secret_attribute(algorithm: Algorithm) -> Attribute:
    """The attribute that would reveal the private or secret key if the HSM let it be read."""
    return Attribute.PRIVATE_EXPONENT if algorithm in RSA_ALGORITHMS else Attribute.VALUE


def algorithm_of(
    key_type: object,
    *,
    ec_params: bytes | None = None,
    modulus: bytes | None = None,
    value_len: int | None = None,
    signs: bool = False,
) -> Algorithm | None:
    """The algorithm a key found in the token is for, or None if it is none of ours.

    An RSA-3072 key that may sign is an RSA-PSS signing key; one that may not is a registration transport
    key (RSA-OAEP). A 32-byte AES key is a KEK; a generic secret is an HMAC-SHA256 key.
    """
    if key_type == KeyType.EC:
        for algorithm, (params, _) in _CURVES.items():
            if ec_params == params:
                return algorithm
    elif key_type == KeyType.RSA:
        if modulus is not None and int.from_bytes(modulus, "big").bit_length() == RSA_BITS:
            return Algorithm.RSA_3072_PSS_SHA256 if signs else Algorithm.RSA_3072_OAEP_SHA256
    elif key_type == KeyType.AES:
        if value_len == SECRET_KEY_BYTES:
            return Algorithm.AES_256
    elif key_type == KeyType.GENERIC_SECRET:
        return Algorithm.HMAC_SHA256
    return None


def ec_public_key_der(algorithm: Algorithm, ec_point: bytes) -> bytes:
    """SubjectPublicKeyInfo DER from CKA_EC_POINT.

    PKCS#11 2.40 stores the point DER-encoded, as an OCTET STRING (``04 len 04 X Y``) around the
    uncompressed X9.62 point; some modules return the bare point (``04 X Y``). Both are accepted; the
    lengths differ, so they cannot be confused. The point is checked to lie on the curve.
    """
    _, curve = _CURVES[algorithm]
    point_length = 1 + 2 * ((curve.key_size + 7) // 8)
    if len(ec_point) == point_length + 2 and ec_point[0] == 0x04 and ec_point[1] == point_length:
        point = ec_point[2:]
    elif len(ec_point) == point_length:
        point = ec_point
    else:
        raise HsmFailure("the HSM returned a malformed EC public key")
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError as e:
        raise HsmFailure("the HSM returned an EC public key that is not on the curve") from e
    return _spki(key)


def rsa_public_key_der(modulus: bytes, exponent: bytes) -> bytes:
    """SubjectPublicKeyInfo DER from CKA_MODULUS and CKA_PUBLIC_EXPONENT (big-endian integers)."""
    n = int.from_bytes(modulus, "big")
    e = int.from_bytes(exponent, "big")
    if n.bit_length() != RSA_BITS or e != RSA_PUBLIC_EXPONENT:
        raise HsmFailure("the HSM returned an RSA public key of the wrong size or exponent")
    return _spki(rsa.RSAPublicNumbers(e, n).public_key())


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
