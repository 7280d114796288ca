"""Secret-key operations in the HSM: KEKs, device secrets, registration transport, HMAC keys.

Session-level functions, called by ``Pkcs11Hsm`` under its lock (they never take it themselves). Mechanisms
are always explicit:

- KEK: an AES-256 token key, ``CKA_SENSITIVE``, not extractable, ``CKA_WRAP``/``CKA_UNWRAP`` only. Device
  secrets (always exactly 32 bytes) are wrapped with AES key wrap, RFC 3394 (``CKM_AES_KEY_WRAP``, 0x2109),
  into 40-byte blobs. RFC 3394 rather than RFC 5649 because the secret's length is a multiple of 8, the
  mechanism number means the same on every HSM (SoftHSM2 puts RFC 5649 under 0x210A, PKCS#11 3.0 under
  0x210B: softhsm/SoftHSMv2#726), and unwrapping a 40-byte blob can only give exactly 32 bytes, so the
  length of a secret is checked by the length of its blob (SoftHSM2 reports no CKA_VALUE_LEN for unwrapped
  generic secrets). The mechanism is recorded with every blob (``WRAP_MECHANISM_NAME``); the tests
  cross-check blobs against ``cryptography``'s RFC 3394.
- Registration transport: an RSA-3072 token key pair whose private half may only decrypt/unwrap. A factory
  sends a random AES-256 batch key encrypted with RSA-OAEP. SoftHSM2 2.6 implements OAEP with SHA-1 and
  MGF1-SHA-1 only (it answers CKR_ARGUMENTS_BAD to SHA-256), so that is the transport's OAEP: OAEP's security
  rests on the hash as a random oracle, not on collision resistance, and SHA-1 remains acceptable there
  (NIST SP 800-56B rev. 2 lists it for OAEP). ``TRANSPORT_OAEP`` names it for clients.
- A device secret is never a token object and never in the service's memory on the transport path: it is
  unwrapped from the batch key (or created from the plaintext on the mTLS path) into a *session* object
  (``CKA_TOKEN`` false, sensitive), wrapped under the KEK, fingerprinted with ``CKM_SHA256_HMAC`` keyed by
  itself, and destroyed. For payload keys the KEK blob is unwrapped into a sensitive, non-extractable session
  object, used once for ``CKM_SHA256_HMAC`` and destroyed.
- Payload-seed key: a 256-bit ``CKK_GENERIC_SECRET`` token key for ``CKM_SHA256_HMAC``, sensitive and not
  extractable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import MechanismFlag as Capability
from pkcs11 import exceptions as p11e

from kms.domain.errors import HsmFailure, InvalidArgument, KmsError
from kms.domain.keys import Algorithm
from kms.domain.ports import ImportedSecret, TransportBatch
from kms.hsm import _keys

WRAP_MECHANISM = Mechanism.AES_KEY_WRAP
WRAP_MECHANISM_NAME = "CKM_AES_KEY_WRAP(0x2109)/RFC3394"
WRAPPED_SECRET_BYTES = 40
TRANSPORT_OAEP = (Mechanism.SHA_1, MGF.SHA1, None)
SECRET_BYTES = 32

_SESSION_SECRET: dict[Attribute, Any] = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
}


def _template(**extra: bool) -> dict[Attribute, Any]:
    return {**_SESSION_SECRET, **{getattr(Attribute, k.upper()): v for k, v in extra.items()}}


def generate_secret_key(session: pkcs11.Session, algorithm: Algorithm, hsm_id: bytes, label: str) -> None:
    """An AES-256 KEK or a 256-bit HMAC key on the token: sensitive, never extractable."""
    protection = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
    }
    if algorithm is Algorithm.AES_256:
        session.generate_key(
            KeyType.AES,
            256,
            id=hsm_id,
            label=label,
            store=True,
            capabilities=Capability.WRAP | Capability.UNWRAP,
            template={**protection, Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.SIGN: False},
        )
    elif algorithm is Algorithm.HMAC_SHA256:
        session.generate_key(
            KeyType.GENERIC_SECRET,
            256,
            id=hsm_id,
            label=label,
            store=True,
            capabilities=Capability.SIGN,
            mechanism=Mechanism.GENERIC_SECRET_KEY_GEN,
            template={**protection, Attribute.SIGN: True, Attribute.WRAP: False, Attribute.UNWRAP: False},
        )
    else:
        raise InvalidArgument(f"{algorithm.value} is not a secret-key algorithm")


def generate_transport_key_pair(session: pkcs11.Session, hsm_id: bytes, label: str) -> bytes:
    """An RSA-3072 pair whose private half only unwraps (batch keys); returns the public SPKI DER."""
    exponent = _keys.RSA_PUBLIC_EXPONENT.to_bytes(3, "big")
    public, _private = session.generate_keypair(
        KeyType.RSA,
        _keys.RSA_BITS,
        id=hsm_id,
        label=label,
        store=True,
        capabilities=Capability.ENCRYPT | Capability.WRAP | Capability.DECRYPT | Capability.UNWRAP,
        mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
        public_template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,
            Attribute.MODULUS_BITS: _keys.RSA_BITS,
            Attribute.PUBLIC_EXPONENT: exponent,
            Attribute.ENCRYPT: True,
            Attribute.WRAP: True,
            Attribute.VERIFY: False,
        },
        private_template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.UNWRAP: True,
            Attribute.DECRYPT: False,
            Attribute.SIGN: False,
            Attribute.DERIVE: False,
        },
    )
    return _keys.rsa_public_key_der(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])


Resolve = Callable[[bytes, ObjectClass], Any]
"""Finds the key object of a class by CKA_ID (``Pkcs11Hsm`` caches the handles)."""


def find_key(session: pkcs11.Session, hsm_id: bytes, object_class: ObjectClass) -> Any:
    """The one key object of this class with this CKA_ID; ``HsmFailure`` if there is none or several."""
    found = list(session.get_objects({Attribute.CLASS: object_class, Attribute.ID: hsm_id}))
    if len(found) != 1:
        raise HsmFailure("the HSM holds no single key with this id")
    return found[0]


def _unwrap_batch_key(resolve: Resolve, batch: TransportBatch) -> Any:
    private = resolve(batch.transport_hsm_id, ObjectClass.PRIVATE_KEY)
    try:
        return private.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            batch.wrapped_batch_key,
            mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=TRANSPORT_OAEP,
            store=False,
            capabilities=Capability.UNWRAP,
            template=_template(extractable=False, unwrap=True),
        )
    except (
        p11e.EncryptedDataInvalid,
        p11e.EncryptedDataLenRange,
        p11e.WrappedKeyInvalid,
        p11e.WrappedKeyLenRange,
        p11e.ArgumentsBad,
        p11e.GeneralError,  # SoftHSM2's answer to a failed integrity check, session intact
    ) as e:
        raise InvalidArgument(
            "wrapped_batch_key does not decrypt under the registration key (RSA-OAEP, SHA-1, MGF1-SHA-1, "
            "empty label)"
        ) from e


def import_secrets(
    session: pkcs11.Session,
    resolve: Resolve,
    kek_hsm_id: bytes,
    secrets: Sequence[bytes],
    transport: TransportBatch | None,
    fingerprint_message: bytes,
) -> list[ImportedSecret | KmsError]:
    kek = resolve(kek_hsm_id, ObjectClass.SECRET_KEY)
    batch_key = _unwrap_batch_key(resolve, transport) if transport is not None else None
    results: list[ImportedSecret | KmsError] = []
    try:
        for secret in secrets:
            try:
                obj = _secret_object(session, batch_key, secret)
            except KmsError as e:
                results.append(e)
                continue
            try:
                wrapped = kek.wrap_key(obj, mechanism=WRAP_MECHANISM)
                fingerprint = obj.sign(fingerprint_message, mechanism=Mechanism.SHA256_HMAC)
                results.append(ImportedSecret(bytes(wrapped), WRAP_MECHANISM_NAME, bytes(fingerprint)))
            finally:
                obj.destroy()
    finally:
        if batch_key is not None:
            with suppress(p11e.PKCS11Error):
                batch_key.destroy()
    return results


def _secret_object(session: pkcs11.Session, batch_key: Any, secret: bytes) -> Any:
    """A session object holding one device secret (extractable only so that the KEK can wrap it)."""
    template = _template(extractable=True, sign=True)
    if batch_key is None:
        if len(secret) != SECRET_BYTES:
            raise InvalidArgument(f"the device secret must be {SECRET_BYTES} bytes, not {len(secret)}")
        return session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
                Attribute.VALUE: secret,
                **template,
            }
        )
    if len(secret) != WRAPPED_SECRET_BYTES:
        raise InvalidArgument(f"a wrapped device secret is {WRAPPED_SECRET_BYTES} bytes, not {len(secret)}")
    try:
        return batch_key.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.GENERIC_SECRET,
            secret,
            mechanism=WRAP_MECHANISM,
            store=False,
            capabilities=Capability.SIGN,
            template=template,
        )
    except (
        p11e.WrappedKeyInvalid,
        p11e.WrappedKeyLenRange,
        p11e.EncryptedDataInvalid,
        p11e.EncryptedDataLenRange,
        p11e.ArgumentsBad,
        p11e.GeneralError,  # SoftHSM2's answer to a failed RFC 3394 integrity check, session intact
    ) as e:
        raise InvalidArgument(
            "the wrapped secret does not unwrap under the batch key (AES key wrap, RFC 3394)"
        ) from e


def hmac_with_wrapped_secret(resolve: Resolve, kek_hsm_id: bytes, wrapped: bytes, message: bytes) -> bytes:
    kek = resolve(kek_hsm_id, ObjectClass.SECRET_KEY)  # a cached handle: a token search costs ~160 µs
    try:
        obj = kek.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.GENERIC_SECRET,
            wrapped,
            mechanism=WRAP_MECHANISM,
            store=False,
            capabilities=Capability.SIGN,
            template=_template(extractable=False, sign=True),
        )
    except (p11e.WrappedKeyInvalid, p11e.WrappedKeyLenRange, p11e.EncryptedDataInvalid) as e:
        raise HsmFailure("a stored device secret does not unwrap under its KEK") from e
    try:
        return bytes(obj.sign(message, mechanism=Mechanism.SHA256_HMAC))
    finally:
        obj.destroy()


def hmac(resolve: Resolve, hsm_id: bytes, message: bytes) -> bytes:
    key = resolve(hsm_id, ObjectClass.SECRET_KEY)
    return bytes(key.sign(message, mechanism=Mechanism.SHA256_HMAC))


def rewrap_secrets(
    resolve: Resolve, old_kek_hsm_id: bytes, new_kek_hsm_id: bytes, blobs: Sequence[bytes]
) -> list[bytes | KmsError]:
    """Each blob unwrapped under the old KEK into a session object and wrapped under the new one.

    The session object is sensitive, extractable only so that the new KEK can wrap it, has no usage flag and
    is destroyed at once: the secret never leaves the HSM. A blob that does not unwrap gives ``HsmFailure``
    in its slot (SoftHSM2 answers a failed RFC 3394 integrity check with CKR_GENERAL_ERROR, session intact).
    """
    old_kek = resolve(old_kek_hsm_id, ObjectClass.SECRET_KEY)
    new_kek = resolve(new_kek_hsm_id, ObjectClass.SECRET_KEY)
    results: list[bytes | KmsError] = []
    for blob in blobs:
        if len(blob) != WRAPPED_SECRET_BYTES:
            results.append(InvalidArgument(f"a wrapped device secret is {WRAPPED_SECRET_BYTES} bytes"))
            continue
        try:
            obj = old_kek.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.GENERIC_SECRET,
                blob,
                mechanism=WRAP_MECHANISM,
                store=False,
                capabilities=Capability(0),
                template=_template(extractable=True, sign=False),
            )
        except (
            p11e.WrappedKeyInvalid,
            p11e.WrappedKeyLenRange,
            p11e.EncryptedDataInvalid,
            p11e.EncryptedDataLenRange,
            p11e.GeneralError,  # SoftHSM2's answer to a failed RFC 3394 integrity check, session intact
        ) as e:
            failure = HsmFailure("a stored device secret does not unwrap under its KEK")
            failure.__cause__ = e
            results.append(failure)
            continue
        try:
            results.append(bytes(new_kek.wrap_key(obj, mechanism=WRAP_MECHANISM)))
        finally:
            obj.destroy()
    return results
