"""``Pkcs11Hsm``: the ``kms.domain.ports.Hsm`` port over a PKCS#11 module, through python-pkcs11.

Every operation is a function of the session run by ``Connection.run`` (``kms.hsm._connection``), which
holds the one process-wide lock around every PKCS#11 call (python-pkcs11 tells the module the application
is single-threaded, then calls it from any thread: the module docstring there explains), logs in once,
reconnects after outages and caches key handles. This module says what each operation does: which
mechanism, which attributes, which checks on the HSM's answers. Key templates and mechanisms are in
``kms.hsm._keys``; the secret-key operations (KEKs, device secrets, HMAC) in ``kms.hsm.secret_keys``.

Which errors mean what: ``HsmUnavailable`` the HSM cannot be reached now (retry later); ``HsmFailure`` it
refused in a way a retry will not fix (no such key, wrong algorithm, mechanism refused, PIN refused);
``InvalidArgument`` the caller's input is malformed (checked before the HSM is asked where possible).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from contextlib import suppress
from types import TracebackType
from typing import TypeVar

import pkcs11
from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.types import SignMixin

from kms.domain.errors import HsmFailure, InvalidArgument, KmsError
from kms.domain.keys import Algorithm
from kms.domain.ports import GeneratedKeyPair, ImportedSecret, TransportBatch
from kms.hsm import _keys, _objects, secret_keys
from kms.hsm._connection import Connection
from kms.hsm._objects import KeyProtection
from kms.hsm.config import HsmConfig

__all__ = ["KeyProtection", "Pkcs11Hsm"]

_log = logging.getLogger("kms.hsm")

_KEY_CLASSES = (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.SECRET_KEY)
_SECRET_ALGORITHMS = (Algorithm.AES_256, Algorithm.HMAC_SHA256)

T = TypeVar("T")


class Pkcs11Hsm:
    """Private- and secret-key operations in a PKCS#11 token. Thread-safe.

    Constructing it does nothing; ``open()`` (or ``with``) connects and logs in, ``close()`` disconnects.
    """

    def __init__(
        self,
        config: HsmConfig,
        *,
        reopen_attempts: int = 3,
        reopen_backoff: float = 0.1,
        reopen_cooldown: float = 2.0,
    ) -> None:
        """After an outage: ``reopen_attempts`` reconnection attempts, ``reopen_backoff`` seconds before the
        second (doubling after), then ``reopen_cooldown`` seconds of failing fast before the next round."""
        self._connection = Connection(
            config,
            reopen_attempts=reopen_attempts,
            reopen_backoff=reopen_backoff,
            reopen_cooldown=reopen_cooldown,
        )

    def open(self) -> None:
        """Load the module, open a session on the configured token and log in. Idempotent.

        Raises ``HsmUnavailable`` if the token cannot be reached now, ``HsmFailure`` if the module cannot be
        loaded, several tokens match or the PIN is refused, ``InvalidArgument`` if the PIN cannot be read.
        Only one open ``Pkcs11Hsm`` per PKCS#11 module is allowed in a process.
        """
        self._connection.open()

    def close(self) -> None:
        """Log out, close the session and finalize the module. Idempotent; never raises HSM errors."""
        self._connection.close()

    def __enter__(self) -> Pkcs11Hsm:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- key pairs -------------------------------------------------------------------------------------

    def generate_key_pair(self, algorithm: Algorithm, label: str) -> GeneratedKeyPair:
        """Generate a key pair on the token; its ``hsm_id`` (CKA_ID of both halves) is 16 random bytes.

        Signing algorithms get the attributes listed in ``kms.hsm._keys``; ``rsa3072-oaep`` makes a
        registration transport key pair (``kms.hsm.secret_keys``). The private half is read back: one the
        token did not protect as asked is destroyed with its public half and ``HsmFailure`` raised.
        Not retried after an outage (a retry could leave an orphan key behind).
        """
        if algorithm in _SECRET_ALGORITHMS:
            raise InvalidArgument(f"{algorithm.value} is a secret-key algorithm: use generate_secret_key")
        hsm_id = secrets.token_bytes(_keys.HSM_ID_BYTES)

        def generate(session: pkcs11.Session) -> bytes:
            if algorithm is Algorithm.RSA_3072_OAEP_SHA256:
                public_der = secret_keys.generate_transport_key_pair(session, hsm_id, label)
            else:
                spec = _keys.key_spec(algorithm)
                public, _ = session.generate_keypair(
                    spec.key_type,
                    spec.key_length,
                    id=hsm_id,
                    label=label,
                    store=True,
                    capabilities=_keys.SIGN_AND_VERIFY,
                    mechanism=spec.mechanism,
                    public_template=spec.public_template,
                    private_template=_keys.private_template(),
                )
                public_der = self._checked(
                    lambda: _objects.public_key_der(public, algorithm), session, hsm_id
                )
            self._check_protection(session, hsm_id, ObjectClass.PRIVATE_KEY, algorithm)
            return public_der

        public_key_der = self._connection.run(generate, "generate a key pair", retry=False)
        _log.info("generated %s key pair %s in the HSM", algorithm.value, hsm_id.hex())
        return GeneratedKeyPair(hsm_id=hsm_id, public_key_der=public_key_der)

    def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        """Sign a digest computed with ``algorithm.hash``; return the RAW signature.

        ECDSA: ``CKM_ECDSA``, r||s big-endian (64 bytes for P-256, 96 for P-384). RSA: ``CKM_RSA_PKCS_PSS``
        with SHA-256, MGF1-SHA-256 and a 32-byte salt, 384 bytes. A digest of the wrong length raises
        ``InvalidArgument`` before the HSM is asked (SoftHSM2 would sign a digest of any length); a key of
        another algorithm, or no key, raises ``HsmFailure``.
        """
        _check_hsm_id(hsm_id)
        if not algorithm.is_signing:
            raise InvalidArgument(f"{algorithm.value} is not a signature algorithm")
        if len(digest) != algorithm.hash.size:
            raise InvalidArgument(
                f"a {algorithm.value} signature needs a {algorithm.hash.size}-byte {algorithm.hash.value} "
                f"digest, got {len(digest)} bytes"
            )
        parameters = _keys.sign_parameters(algorithm)

        def sign(session: pkcs11.Session) -> bytes:
            entry = self._connection.key(session, hsm_id, ObjectClass.PRIVATE_KEY)
            if entry.algorithm is not algorithm or not isinstance(entry.key, SignMixin):
                raise HsmFailure(f"the key with this id is not a key for {algorithm.value}")
            return entry.key.sign(digest, **parameters)

        signature = self._connection.run(sign, "sign", retry=True)
        if len(signature) != algorithm.raw_signature_size:
            raise HsmFailure(f"the HSM returned a {algorithm.value} signature of the wrong length")
        return signature

    def destroy_key_pair(self, hsm_id: bytes) -> None:
        """Destroy every key object (private, public or secret) with this CKA_ID. Idempotent."""
        _check_hsm_id(hsm_id)

        def destroy(session: pkcs11.Session) -> int:
            self._connection.forget(hsm_id)
            found = _objects.find(session, {Attribute.ID: hsm_id})
            keys = [o for o in found if o.object_class in _KEY_CLASSES]
            for key in keys:
                key.destroy()
            return len(keys)

        if self._connection.run(destroy, "destroy a key", retry=True):
            _log.info("destroyed key %s in the HSM", hsm_id.hex())

    def is_available(self) -> bool:
        """True if the token answers now (``C_GetTokenInfo``); cheap enough for every health check.

        False while the connection is broken (it tries to reconnect once the cooldown has passed). A session
        that died silently is noticed, and replaced, by the next operation.
        """
        return self._connection.probe()

    # -- secret keys (kms.hsm.secret_keys says how) --------------------------------------------------------

    def generate_secret_key(self, algorithm: Algorithm, label: str) -> bytes:
        """Generate an AES-256 KEK or a 256-bit HMAC-SHA256 key on the token; return its hsm_id.

        Sensitive, never extractable (checked after generation, as for key pairs). Not retried.
        """
        if algorithm not in _SECRET_ALGORITHMS:
            raise InvalidArgument(f"{algorithm.value} is not a secret-key algorithm")
        hsm_id = secrets.token_bytes(_keys.HSM_ID_BYTES)

        def generate(session: pkcs11.Session) -> None:
            secret_keys.generate_secret_key(session, algorithm, hsm_id, label)
            self._check_protection(session, hsm_id, ObjectClass.SECRET_KEY, algorithm)

        self._connection.run(generate, "generate a secret key", retry=False)
        _log.info("generated %s key %s in the HSM", algorithm.value, hsm_id.hex())
        return hsm_id

    def import_secrets(
        self,
        kek_hsm_id: bytes,
        secrets: Sequence[bytes],
        *,
        transport: TransportBatch | None,
        fingerprint_message: bytes,
    ) -> list[ImportedSecret | KmsError]:
        """Wrap device secrets under the KEK (see ``kms.domain.ports.Hsm.import_secrets``)."""
        _check_hsm_id(kek_hsm_id)

        def run(session: pkcs11.Session) -> list[ImportedSecret | KmsError]:
            def resolve(hsm_id: bytes, object_class: ObjectClass) -> pkcs11.Object:
                return self._connection.key(session, hsm_id, object_class).key

            return secret_keys.import_secrets(
                session, resolve, kek_hsm_id, secrets, transport, fingerprint_message
            )

        return self._connection.run(run, "import device secrets", retry=True)

    def hmac_with_wrapped_secret(self, kek_hsm_id: bytes, wrapped: bytes, message: bytes) -> bytes:
        """HMAC-SHA256 keyed by a KEK-wrapped secret, unwrapped only inside the HSM (a session object)."""
        _check_hsm_id(kek_hsm_id)

        def run(session: pkcs11.Session) -> bytes:
            def resolve(key_id: bytes, object_class: ObjectClass) -> pkcs11.Object:
                return self._connection.key(session, key_id, object_class).key

            return secret_keys.hmac_with_wrapped_secret(resolve, kek_hsm_id, wrapped, message)

        return self._connection.run(run, "derive a payload key", retry=True)

    def rewrap_secrets(
        self, old_kek_hsm_id: bytes, new_kek_hsm_id: bytes, blobs: Sequence[bytes]
    ) -> list[bytes | KmsError]:
        """Rewrap KEK-wrapped device secrets from one KEK to another inside the HSM (one result per blob)."""
        _check_hsm_id(old_kek_hsm_id)
        _check_hsm_id(new_kek_hsm_id)

        def run(session: pkcs11.Session) -> list[bytes | KmsError]:
            def resolve(key_id: bytes, object_class: ObjectClass) -> pkcs11.Object:
                return self._connection.key(session, key_id, object_class).key

            return secret_keys.rewrap_secrets(resolve, old_kek_hsm_id, new_kek_hsm_id, blobs)

        return self._connection.run(run, "rewrap device secrets", retry=True)

    def hmac(self, hsm_id: bytes, message: bytes) -> bytes:
        """HMAC-SHA256 with an HSM-held HMAC key."""
        _check_hsm_id(hsm_id)

        def run(session: pkcs11.Session) -> bytes:
            def resolve(key_id: bytes, object_class: ObjectClass) -> pkcs11.Object:
                return self._connection.key(session, key_id, object_class).key

            return secret_keys.hmac(resolve, hsm_id, message)

        return self._connection.run(run, "compute an HMAC", retry=True)

    # -- inspection (beyond the port) -----------------------------------------------------------------

    def public_key_der(self, hsm_id: bytes) -> bytes:
        """The public half of a key pair, as SubjectPublicKeyInfo DER, read back from the token."""
        _check_hsm_id(hsm_id)

        def read(session: pkcs11.Session) -> bytes:
            entry = self._connection.key(session, hsm_id, ObjectClass.PUBLIC_KEY)
            if entry.algorithm is None:
                raise HsmFailure("the public key with this id is not of a supported algorithm")
            return _objects.public_key_der(entry.key, entry.algorithm)

        return self._connection.run(read, "read a public key", retry=True)

    def private_key_protection(self, hsm_id: bytes) -> KeyProtection:
        """The private key's protection attributes; also tries (and expects to fail) to read its value."""
        return self._protection(hsm_id, ObjectClass.PRIVATE_KEY)

    def secret_key_protection(self, hsm_id: bytes) -> KeyProtection:
        """The same for a secret key (KEK, HMAC key)."""
        return self._protection(hsm_id, ObjectClass.SECRET_KEY)

    def verify_key_protection(self, hsm_id: bytes) -> None:
        """Raise ``HsmFailure`` unless the private key is sensitive, non-extractable and unreadable."""
        if not self.private_key_protection(hsm_id).is_protected:
            raise HsmFailure("the private key is not protected as required (sensitive, non-extractable)")

    def kill_session_for_tests(self) -> None:
        """Fault injection: close the session behind the adapter's back, as an HSM outage would."""
        self._connection.kill_session_for_tests()

    # -- helpers (run inside Connection.run, so with the lock held) ----------------------------------------

    def _protection(self, hsm_id: bytes, object_class: ObjectClass) -> KeyProtection:
        _check_hsm_id(hsm_id)

        def inspect(session: pkcs11.Session) -> KeyProtection:
            entry = self._connection.key(session, hsm_id, object_class)
            if entry.algorithm is None:
                raise HsmFailure("the key with this id is not of a supported algorithm")
            return _objects.protection(entry.key, entry.algorithm)

        return self._connection.run(inspect, "read key attributes", retry=True)

    def _check_protection(
        self, session: pkcs11.Session, hsm_id: bytes, object_class: ObjectClass, algorithm: Algorithm
    ) -> None:
        """After generation: the key must be protected as asked, or the new objects are destroyed."""

        def check() -> None:
            entry = self._connection.key(session, hsm_id, object_class)
            if entry.algorithm is not algorithm:
                raise HsmFailure(f"the HSM generated a key that is not a {algorithm.value} key")
            if not _objects.protection(entry.key, algorithm).is_protected:
                raise HsmFailure("the HSM did not apply the required protection to a new key")

        self._checked(check, session, hsm_id)

    def _checked(self, step: Callable[[], T], session: pkcs11.Session, hsm_id: bytes) -> T:
        """Run a step after generating ``hsm_id``; if it fails, destroy what was generated and re-raise."""
        try:
            return step()
        except BaseException:
            self._connection.forget(hsm_id)
            with suppress(p11e.PKCS11Error):
                for key in _objects.find(session, {Attribute.ID: hsm_id}):
                    key.destroy()
            raise


def _check_hsm_id(hsm_id: bytes) -> None:
    if not isinstance(hsm_id, bytes) or not 1 <= len(hsm_id) <= 255:
        raise InvalidArgument("an HSM key id is 1 to 255 bytes")
