"""Reading key objects through python-pkcs11: what a key is, how it is protected, its public half.

Every function here calls the PKCS#11 module, so it must run with the adapter's lock held (inside
``Connection.run``); none takes the lock itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11e

from kms.domain.errors import HsmFailure
from kms.domain.keys import Algorithm
from kms.hsm import _keys


@dataclass(frozen=True)
class KeyProtection:
    """The protection attributes of a private or secret key, as the HSM reports them."""

    token: bool
    private: bool
    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool
    secret_readable: bool
    """True if reading CKA_VALUE (EC, secret keys) or CKA_PRIVATE_EXPONENT (RSA) returned a value; the
    value itself is dropped at once."""

    @property
    def is_protected(self) -> bool:
        """Stored, login-protected, never readable and never extractable, now or since generation."""
        return (
            self.token
            and self.private
            and self.sensitive
            and not self.extractable
            and self.always_sensitive
            and self.never_extractable
            and not self.secret_readable
        )


def find(session: pkcs11.Session, template: dict[Attribute, Any]) -> list[pkcs11.Object]:
    """All objects matching ``template``.

    The search is drained completely, so python-pkcs11 ends it (``C_FindObjectsFinal``) here, under the
    lock, and not later from a garbage-collected iterator in whatever thread.
    """
    return list(session.get_objects(template))


def algorithm_of(key: pkcs11.Object) -> Algorithm | None:
    """Which of the service's algorithms a key object is for (see ``_keys.algorithm_of``)."""
    key_type = key[Attribute.KEY_TYPE]
    if key_type == KeyType.EC:
        return _keys.algorithm_of(key_type, ec_params=key[Attribute.EC_PARAMS])
    if key_type == KeyType.RSA:
        capability = Attribute.VERIFY if key.object_class == ObjectClass.PUBLIC_KEY else Attribute.SIGN
        return _keys.algorithm_of(key_type, modulus=key[Attribute.MODULUS], signs=bool(key[capability]))
    if key_type == KeyType.AES:
        return _keys.algorithm_of(key_type, value_len=int(key[Attribute.VALUE_LEN]))
    return _keys.algorithm_of(key_type)


def public_key_der(public: pkcs11.Object, algorithm: Algorithm) -> bytes:
    """SubjectPublicKeyInfo DER of a public key object."""
    if algorithm in _keys.RSA_ALGORITHMS:
        return _keys.rsa_public_key_der(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])
    if algorithm.is_ecdsa:
        return _keys.ec_public_key_der(algorithm, public[Attribute.EC_POINT])
    raise HsmFailure(f"{algorithm.value} keys have no public half")


def protection(key: pkcs11.Object, algorithm: Algorithm) -> KeyProtection:
    """Read the protection attributes of a private or secret key, and try to read its value."""
    values = key.get_attributes(
        [
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.ALWAYS_SENSITIVE,
            Attribute.NEVER_EXTRACTABLE,
        ]
    )
    try:
        key[_keys.secret_attribute(algorithm)]
        readable = True
    except (p11e.AttributeSensitive, p11e.AttributeTypeInvalid):
        readable = False
    return KeyProtection(
        token=bool(values[Attribute.TOKEN]),
        private=bool(values[Attribute.PRIVATE]),
        sensitive=bool(values[Attribute.SENSITIVE]),
        extractable=bool(values[Attribute.EXTRACTABLE]),
        always_sensitive=bool(values[Attribute.ALWAYS_SENSITIVE]),
        never_extractable=bool(values[Attribute.NEVER_EXTRACTABLE]),
        secret_readable=readable,
    )
