"""Key templates and public key decoding of the PKCS#11 adapter (no HSM needed)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism
from pkcs11.util.ec import encode_named_curve_parameters

from kms.domain.errors import HsmFailure
from kms.domain.keys import Algorithm
from kms.hsm import _keys


def _point(curve: ec.EllipticCurve) -> tuple[bytes, bytes]:
    public = ec.generate_private_key(curve).public_key()
    point = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return point, spki


@pytest.mark.parametrize(
    ("algorithm", "curve"),
    [(Algorithm.ECDSA_P256_SHA256, ec.SECP256R1()), (Algorithm.ECDSA_P384_SHA384, ec.SECP384R1())],
)
def test_ec_point_wrapped_or_bare(algorithm: Algorithm, curve: ec.EllipticCurve) -> None:
    point, spki = _point(curve)
    wrapped = bytes([0x04, len(point)]) + point  # DER OCTET STRING, as PKCS#11 2.40 stores CKA_EC_POINT
    assert _keys.ec_public_key_der(algorithm, wrapped) == spki
    assert _keys.ec_public_key_der(algorithm, point) == spki
    algorithm.check_public_key(spki)


def test_malformed_ec_points_are_refused() -> None:
    point, _ = _point(ec.SECP256R1())
    p256 = Algorithm.ECDSA_P256_SHA256
    with pytest.raises(HsmFailure, match="malformed"):
        _keys.ec_public_key_der(p256, point[:-1])
    with pytest.raises(HsmFailure, match="malformed"):
        _keys.ec_public_key_der(Algorithm.ECDSA_P384_SHA384, bytes([0x04, len(point)]) + point)
    off_curve = point[:-1] + bytes([point[-1] ^ 1])
    with pytest.raises(HsmFailure, match="not on the curve"):
        _keys.ec_public_key_der(p256, off_curve)


def test_rsa_public_key() -> None:
    public = rsa.generate_private_key(65537, 3072).public_key()
    n = public.public_numbers().n
    der = _keys.rsa_public_key_der(n.to_bytes(384, "big"), b"\x01\x00\x01")
    assert der == public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(HsmFailure, match="wrong size or exponent"):
        _keys.rsa_public_key_der(n.to_bytes(384, "big"), b"\x03")
    with pytest.raises(HsmFailure, match="wrong size or exponent"):
        _keys.rsa_public_key_der((n >> 8).to_bytes(383, "big"), b"\x01\x00\x01")


def test_named_curve_parameters_are_the_der_oids() -> None:
    # Cross-checked against python-pkcs11's own encoder (asn1crypto).
    assert encode_named_curve_parameters("1.2.840.10045.3.1.7") == _keys.P256_PARAMS
    assert encode_named_curve_parameters("1.3.132.0.34") == _keys.P384_PARAMS


def test_algorithm_of() -> None:
    assert _keys.algorithm_of(KeyType.EC, ec_params=_keys.P256_PARAMS) is Algorithm.ECDSA_P256_SHA256
    assert _keys.algorithm_of(KeyType.EC, ec_params=_keys.P384_PARAMS) is Algorithm.ECDSA_P384_SHA384
    assert _keys.algorithm_of(KeyType.EC, ec_params=b"\x06\x05\x2b\x81\x04\x00\x23") is None  # P-521
    rsa_3072 = b"\xff" * 384
    assert _keys.algorithm_of(KeyType.RSA, modulus=rsa_3072, signs=True) is Algorithm.RSA_3072_PSS_SHA256
    assert _keys.algorithm_of(KeyType.RSA, modulus=rsa_3072, signs=False) is Algorithm.RSA_3072_OAEP_SHA256
    assert _keys.algorithm_of(KeyType.RSA, modulus=b"\xff" * 256, signs=True) is None
    assert _keys.algorithm_of(KeyType.AES, value_len=32) is Algorithm.AES_256
    assert _keys.algorithm_of(KeyType.AES, value_len=16) is None
    assert _keys.algorithm_of(KeyType.GENERIC_SECRET) is Algorithm.HMAC_SHA256
    assert _keys.algorithm_of(KeyType.DES3) is None


def test_only_signing_algorithms_have_a_key_pair_spec() -> None:
    for algorithm in Algorithm:
        if algorithm.is_signing:
            assert _keys.key_spec(algorithm).key_type in (KeyType.EC, KeyType.RSA)
        else:
            with pytest.raises(ValueError, match="not a signing algorithm"):
                _keys.key_spec(algorithm)


def test_secret_attributes() -> None:
    assert _keys.secret_attribute(Algorithm.RSA_3072_PSS_SHA256) is Attribute.PRIVATE_EXPONENT
    assert _keys.secret_attribute(Algorithm.RSA_3072_OAEP_SHA256) is Attribute.PRIVATE_EXPONENT
    for algorithm in (Algorithm.ECDSA_P256_SHA256, Algorithm.AES_256, Algorithm.HMAC_SHA256):
        assert _keys.secret_attribute(algorithm) is Attribute.VALUE


def test_sign_mechanisms_are_explicit() -> None:
    assert _keys.sign_parameters(Algorithm.ECDSA_P256_SHA256) == {"mechanism": Mechanism.ECDSA}
    assert _keys.sign_parameters(Algorithm.ECDSA_P384_SHA384) == {"mechanism": Mechanism.ECDSA}
    assert _keys.sign_parameters(Algorithm.RSA_3072_PSS_SHA256) == {
        "mechanism": Mechanism.RSA_PKCS_PSS,
        "mechanism_param": (Mechanism.SHA256, MGF.SHA256, 32),
    }


def test_private_template_protects_the_key() -> None:
    template = _keys.private_template()
    assert template[Attribute.SENSITIVE] is True
    assert template[Attribute.EXTRACTABLE] is False
    assert template[Attribute.TOKEN] is True
    assert template[Attribute.PRIVATE] is True
    assert template[Attribute.SIGN] is True
    assert not any(template[a] for a in (Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE))


def test_key_specs() -> None:
    rsa_spec = _keys.key_spec(Algorithm.RSA_3072_PSS_SHA256)
    assert (rsa_spec.key_type, rsa_spec.mechanism, rsa_spec.key_length) == (
        KeyType.RSA,
        Mechanism.RSA_PKCS_KEY_PAIR_GEN,
        3072,
    )
    assert rsa_spec.public_template[Attribute.PUBLIC_EXPONENT] == b"\x01\x00\x01"
    ec_spec = _keys.key_spec(Algorithm.ECDSA_P384_SHA384)
    assert (ec_spec.key_type, ec_spec.mechanism) == (KeyType.EC, Mechanism.EC_KEY_PAIR_GEN)
    assert ec_spec.public_template[Attribute.EC_PARAMS] == _keys.P384_PARAMS
    assert ec_spec.public_template[Attribute.TOKEN] is True
