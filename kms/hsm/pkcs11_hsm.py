"""``Pkcs11Hsm``: the ``kms.domain.ports.Hsm`` port over a PKCS#11 module, through python-pkcs11.

Why every PKCS#11 call is behind one lock
-----------------------------------------
python-pkcs11 0.10.1 calls ``C_Initialize(NULL)``: no ``CKF_OS_LOCKING_OK``, no mutex callbacks. To the
module this promises that the application never calls it from two threads at once, and SoftHSM2 takes the
promise at its word and turns its own locking off. Yet python-pkcs11 releases the GIL around nearly every
call, so two Python threads can be inside the module together; on this project's machines two threads
signing at once aborted the interpreter with heap corruption within a second. So every call into the
module, from every ``Pkcs11Hsm``, goes through ``_PKCS11_LOCK``, one lock for the whole process: the
module's state is per process, not per object. (python-pkcs11 finalizes an interrupted object search from
``__del__``; CPython runs it while the exception unwinds, so that call is under the lock too.)

The cost: one operation in flight at a time. SoftHSM2 signs ECDSA P-256 in tens of microseconds, so one
thread is plenty; a network HSM is limited to one round trip at a time. If that is ever too slow, run
signing in worker processes started with ``spawn`` (never ``fork`` after ``C_Initialize``), each calling
``C_Initialize`` and logging in itself.

Lifecycle
---------
Constructing a ``Pkcs11Hsm`` does nothing. ``open()`` loads the module (``C_Initialize``), finds the one
initialized token the configuration selects, opens one read/write session and logs in once (PKCS#11 login
state is per process and token, so a second login would fail). All operations use that session. Private
key handles are cached by ``CKA_ID``, since searching a token is slow with many objects (SoftHSM2 #711).
``close()`` logs out, closes the session and finalizes the module. Only one open ``Pkcs11Hsm`` per module
is allowed in a process, because closing one would log out and finalize the other.

When the HSM goes away
----------------------
Device and session errors (``CKR_DEVICE_ERROR``, ``CKR_DEVICE_REMOVED``, ``CKR_SESSION_HANDLE_INVALID``,
``CKR_TOKEN_NOT_PRESENT``, ...) mark the connection broken and raise ``HsmUnavailable``. The next call
reconnects (finalize, initialize, find the token, new session, login) with a bounded number of attempts
and exponential backoff, still holding the lock, since nothing else could use the HSM meanwhile. Signing
and destroying are retried once on the new session; generating is not (a retry could leave an orphan key
behind). After a failed reconnection, calls fail fast with ``HsmUnavailable`` and ``is_available()``
reports False until a cooldown has passed, then the next call or health check tries again. A refused PIN is
never tried again (``HsmFailure`` until ``close()`` and ``open()``): HSMs lock the PIN after a few failures.

Errors that a retry will not fix (missing key, mechanism refused, wrong PIN) raise ``HsmFailure``.
Messages never carry PKCS#11 return codes or paths; the python-pkcs11 exception is chained as the cause.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import pkcs11
from pkcs11 import Attribute, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11e
from pkcs11.types import SignMixin

from kms.domain.errors import HsmFailure, HsmUnavailable, InvalidArgument, KmsError
from kms.domain.keys import Algorithm
from kms.domain.ports import GeneratedKeyPair
from kms.hsm import _keys
from kms.hsm.config import HsmConfig

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Library  # noqa: N812

_log = logging.getLogger(__name__)

_PKCS11_LOCK = threading.Lock()
"""Serializes every PKCS#11 call in the process (see the module docstring)."""

_MODULES_IN_USE: set[str] = set()
"""Real paths of the modules an open ``Pkcs11Hsm`` owns; guarded by ``_PKCS11_LOCK``."""

_UNAVAILABLE: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.DeviceRemoved,
    p11e.GeneralError,
    p11e.SessionClosed,
    p11e.SessionCount,
    p11e.SessionHandleInvalid,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
)
"""Errors after which the session is suspect and reconnecting may help."""

_STALE_HANDLE = (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid)

T = TypeVar("T")


@dataclass(frozen=True)
class KeyProtection:
    """The protection attributes of a private key, as the HSM reports them."""

    token: bool
    private: bool
    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool
    secret_readable: bool
    """True if reading CKA_VALUE (EC) or CKA_PRIVATE_EXPONENT (RSA) returned a value (it is discarded)."""

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


@dataclass(frozen=True)
class _CachedKey:
    key: SignMixin
    algorithm: Algorithm | None


class Pkcs11Hsm:
    """Private-key operations in a PKCS#11 token. Thread-safe; see the module docstring."""

    def __init__(
        self,
        config: HsmConfig,
        *,
        reopen_attempts: int = 3,
        reopen_backoff: float = 0.1,
        reopen_cooldown: float = 2.0,
    ) -> None:
        """``reopen_attempts`` reconnection attempts, ``reopen_backoff`` seconds before the second (doubling
        after), then ``reopen_cooldown`` seconds of failing fast before the next round."""
        if reopen_attempts < 1 or reopen_backoff < 0 or reopen_cooldown < 0:
            raise ValueError("reopen_attempts must be >= 1 and the delays >= 0")
        self._config = config
        self._reopen_attempts = reopen_attempts
        self._reopen_backoff = reopen_backoff
        self._reopen_cooldown = reopen_cooldown
        # Everything below is read and written only while holding _PKCS11_LOCK.
        self._module_key: str | None = None
        self._lib: Pkcs11Library | None = None
        self._token: pkcs11.Token | None = None
        self._session: pkcs11.Session | None = None
        self._opened = False
        self._broken = False
        self._retry_at = 0.0
        self._pin_refused = False
        self._keys: dict[bytes, _CachedKey] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Load the module, open a session on the configured token and log in. Idempotent.

        Raises ``HsmUnavailable`` if the token cannot be reached now, ``HsmFailure`` if the module cannot be
        loaded, several tokens match or the PIN is refused, ``InvalidArgument`` if the PIN cannot be read.
        """
        with _PKCS11_LOCK:
            if self._opened:
                return
            module_key = os.path.realpath(self._config.module_path)
            if module_key in _MODULES_IN_USE:
                raise HsmFailure("another open Pkcs11Hsm in this process already uses this PKCS#11 module")
            self._pin_refused = False
            self._retry_at = 0.0
            try:
                self._connect_locked()
            except BaseException:
                self._disconnect_locked(finalize=True)
                raise
            _MODULES_IN_USE.add(module_key)
            self._module_key = module_key
            self._opened = True
            self._broken = False

    def close(self) -> None:
        """Log out, close the session and finalize the module. Idempotent; never raises HSM errors."""
        with _PKCS11_LOCK:
            if not self._opened:
                return
            self._disconnect_locked(finalize=True)
            if self._module_key is not None:
                _MODULES_IN_USE.discard(self._module_key)
            self._module_key = None
            self._opened = False

    def __enter__(self) -> Pkcs11Hsm:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the Hsm port --------------------------------------------------------------------------------

    def generate_key_pair(self, algorithm: Algorithm, label: str) -> GeneratedKeyPair:
        """Generate a sensitive, non-extractable key pair on the token (attributes in ``kms.hsm._keys``).

        The ``hsm_id`` (CKA_ID of both halves) is 16 random bytes. The HSM's answer is checked: a private
        key the token did not protect as asked is destroyed and ``HsmFailure`` raised.
        """
        hsm_id = secrets.token_bytes(_keys.HSM_ID_BYTES)
        spec = _keys.key_spec(algorithm)

        def generate(session: pkcs11.Session) -> bytes:
            public, private = session.generate_keypair(
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
            try:
                if not _protection(private, algorithm).is_protected:
                    raise HsmFailure("the HSM did not apply the required protection to a new private key")
                public_der = _public_key_der(public, algorithm)
            except BaseException:
                for half in (private, public):
                    with suppress(p11e.PKCS11Error):
                        half.destroy()
                raise
            if isinstance(private, SignMixin):
                self._keys[hsm_id] = _CachedKey(private, algorithm)
            return public_der

        public_key_der = self._run(generate, "generate a key pair", retry=False)
        _log.info("generated %s key pair %s in the HSM", algorithm.value, hsm_id.hex())
        return GeneratedKeyPair(hsm_id=hsm_id, public_key_der=public_key_der)

    def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        """Sign a digest computed with ``algorithm.hash``; return the RAW signature.

        ECDSA: r||s big-endian (64 bytes for P-256, 96 for P-384). RSA: the 384-byte RSA-PSS signature with
        SHA-256, MGF1-SHA-256 and a 32-byte salt. A digest of the wrong length raises ``InvalidArgument``
        before the HSM is asked (SoftHSM2 would sign a digest of any length); a key of another algorithm
        raises ``HsmFailure``.
        """
        _check_hsm_id(hsm_id)
        if len(digest) != algorithm.hash.size:
            raise InvalidArgument(
                f"a {algorithm.value} signature needs a {algorithm.hash.size}-byte {algorithm.hash.value} "
                f"digest, got {len(digest)} bytes"
            )
        parameters = _keys.sign_parameters(algorithm)

        def sign(session: pkcs11.Session) -> bytes:
            entry = self._private_key_locked(session, hsm_id)
            if entry.algorithm is not algorithm:
                raise HsmFailure(f"the key with this id is not a key for {algorithm.value}")
            try:
                return entry.key.sign(digest, **parameters)
            except _STALE_HANDLE:
                # The cached handle went stale (the key was destroyed, or the module renumbered objects).
                self._keys.pop(hsm_id, None)
                entry = self._private_key_locked(session, hsm_id)
                return entry.key.sign(digest, **parameters)

        signature = self._run(sign, "sign", retry=True)
        if len(signature) != algorithm.raw_signature_size:
            raise HsmFailure(f"the HSM returned a {algorithm.value} signature of the wrong length")
        return signature

    def destroy_key_pair(self, hsm_id: bytes) -> None:
        """Destroy both halves of a key pair (every key object with this CKA_ID). Idempotent."""
        _check_hsm_id(hsm_id)

        def destroy(session: pkcs11.Session) -> int:
            self._keys.pop(hsm_id, None)
            found = _find(session, {Attribute.ID: hsm_id})
            keys = [o for o in found if o.object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)]
            for key in keys:
                key.destroy()
            return len(keys)

        if self._run(destroy, "destroy a key pair", retry=True):
            _log.info("destroyed key pair %s in the HSM", hsm_id.hex())

    def is_available(self) -> bool:
        """True if the HSM answers now (``C_GetTokenInfo``); cheap enough for every health check.

        While the connection is broken this returns False, and tries to reconnect once the cooldown has
        passed. A session that died silently is noticed (and replaced) by the next operation.
        """
        with _PKCS11_LOCK:
            if not self._opened:
                return False
            if self._broken or self._token is None:
                try:
                    self._reopen_locked()
                except KmsError:
                    return False
            assert self._token is not None
            try:
                info = self._token.slot.get_token()
            except p11e.PKCS11Error as e:
                if isinstance(e, _UNAVAILABLE):
                    self._mark_broken_locked(e)
                return False
            flags = info.flags
            return bool(flags & TokenFlag.TOKEN_INITIALIZED) and not flags & TokenFlag.USER_PIN_LOCKED

    # -- beyond the port: inspection -----------------------------------------------------------------

    def public_key_der(self, hsm_id: bytes) -> bytes:
        """The public half of a key pair, as SubjectPublicKeyInfo DER, read back from the token."""
        _check_hsm_id(hsm_id)

        def read(session: pkcs11.Session) -> bytes:
            algorithm = self._private_key_locked(session, hsm_id).algorithm
            found = _find(session, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: hsm_id})
            if algorithm is None or len(found) != 1:
                raise HsmFailure("the HSM holds no single public key of a known algorithm with this id")
            return _public_key_der(found[0], algorithm)

        return self._run(read, "read a public key", retry=True)

    def private_key_protection(self, hsm_id: bytes) -> KeyProtection:
        """Read the private key's protection attributes, and try (and expect to fail) to read its value."""
        _check_hsm_id(hsm_id)

        def inspect(session: pkcs11.Session) -> KeyProtection:
            entry = self._private_key_locked(session, hsm_id)
            if entry.algorithm is None:
                raise HsmFailure("the key with this id is not of a supported algorithm")
            return _protection(entry.key, entry.algorithm)

        return self._run(inspect, "read key attributes", retry=True)

    def verify_key_protection(self, hsm_id: bytes) -> None:
        """Raise ``HsmFailure`` unless the private key is sensitive, non-extractable and unreadable."""
        if not self.private_key_protection(hsm_id).is_protected:
            raise HsmFailure("the private key is not protected as required (sensitive, non-extractable)")

    # -- internals: everything below runs with _PKCS11_LOCK held -----------------------------------------

    def _run(self, operation: Callable[[pkcs11.Session], T], what: str, *, retry: bool) -> T:
        """Run ``operation`` on the session under the lock, translating python-pkcs11's exceptions.

        On a device or session error the connection is marked broken; with ``retry`` it is reopened and
        the operation run once more.
        """
        with _PKCS11_LOCK:
            session = self._session_locked()
            try:
                return operation(session)
            except p11e.PKCS11Error as e:
                if not isinstance(e, _UNAVAILABLE):
                    raise HsmFailure(f"the HSM refused to {what}") from e
                self._mark_broken_locked(e)
                if not retry:
                    raise HsmUnavailable(f"the HSM became unavailable while trying to {what}") from e
            session = self._reopen_locked()
            try:
                return operation(session)
            except p11e.PKCS11Error as e:
                if isinstance(e, _UNAVAILABLE):
                    self._mark_broken_locked(e)
                    raise HsmUnavailable(f"the HSM became unavailable while trying to {what}") from e
                raise HsmFailure(f"the HSM refused to {what}") from e

    def _session_locked(self) -> pkcs11.Session:
        if not self._opened:
            raise HsmUnavailable("the HSM connection is not open")
        if self._broken or self._session is None:
            return self._reopen_locked()
        return self._session

    def _mark_broken_locked(self, error: BaseException) -> None:
        if not self._broken:
            _log.warning("HSM connection lost (%s); will reconnect", type(error).__name__)
        self._broken = True
        self._keys.clear()

    def _reopen_locked(self) -> pkcs11.Session:
        """Reconnect from scratch, with bounded attempts; raise ``HsmUnavailable`` if it cannot.

        A refused PIN is never tried again (HSMs lock the PIN after a few failures): the adapter stays
        broken, raising ``HsmFailure``, until ``close()`` and ``open()``. Other refusals (a module that no
        longer loads, an ambiguous token) are raised as they are and tried again after the cooldown; an
        unreadable PIN source counts as an outage.
        """
        if self._pin_refused:
            raise HsmFailure("the HSM refused the PIN; it is not tried again until the HSM is reopened")
        if time.monotonic() < self._retry_at:
            raise HsmUnavailable("the HSM is unavailable; reconnection will be tried again shortly")
        self._broken = True
        last: BaseException | None = None
        for attempt in range(self._reopen_attempts):
            if attempt:
                time.sleep(self._reopen_backoff * 2 ** (attempt - 1))
            self._disconnect_locked(finalize=True)
            try:
                session = self._connect_locked()
            except HsmUnavailable as e:
                last = e
                continue
            except HsmFailure:
                self._retry_at = time.monotonic() + self._reopen_cooldown
                raise
            except KmsError as e:  # the PIN source cannot be read now
                last = e
                break
            self._broken = False
            self._retry_at = 0.0
            _log.warning("HSM connection re-established")
            return session
        self._retry_at = time.monotonic() + self._reopen_cooldown
        cause = last.__cause__ if last is not None and last.__cause__ is not None else last
        _log.warning(
            "HSM reconnection failed after %d attempts (%s); next try in %.1f s",
            self._reopen_attempts,
            type(cause).__name__,
            self._reopen_cooldown,
        )
        raise HsmUnavailable("the HSM is unavailable; reconnection failed") from last

    def _connect_locked(self) -> pkcs11.Session:
        pin = self._config.read_pin()
        try:
            lib = pkcs11.lib(str(self._config.module_path))
        except p11e.PKCS11Error as e:
            if isinstance(e, _UNAVAILABLE):
                raise HsmUnavailable("the PKCS#11 module cannot reach the HSM") from e
            raise HsmFailure("the PKCS#11 module cannot be loaded or initialized") from e
        self._lib = lib
        try:
            token = self._find_token_locked(lib)
            try:
                session = token.open(rw=True, user_pin=pin)
            except p11e.UserAlreadyLoggedIn:
                # Login is per process and token; this process is logged in already.
                session = token.open(rw=True)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinLocked, p11e.PinExpired) as e:
            self._pin_refused = True
            raise HsmFailure("the HSM refused the PIN") from e
        except p11e.PKCS11Error as e:
            if isinstance(e, _UNAVAILABLE):
                raise HsmUnavailable("the HSM token cannot be reached") from e
            raise HsmFailure("the HSM refused to open a session") from e
        self._token = token
        self._session = session
        self._keys.clear()
        return session

    def _find_token_locked(self, lib: Pkcs11Library) -> pkcs11.Token:
        config = self._config
        matches = []
        for slot in lib.get_slots(token_present=True):
            if config.slot_id is not None and slot.slot_id != config.slot_id:
                continue
            try:
                token = slot.get_token()
            except (p11e.TokenNotPresent, p11e.TokenNotRecognised):
                continue
            if not token.flags & TokenFlag.TOKEN_INITIALIZED:
                continue
            serial = token.serial.decode("ascii", "replace").strip()
            wanted = (
                (config.token_label, token.label),
                (config.token_serial, serial),
                (config.token_manufacturer, token.manufacturer_id),
                (config.token_model, token.model),
            )
            if all(want is None or want == have for want, have in wanted):
                matches.append(token)
        if not matches:
            raise HsmUnavailable("no initialized HSM token matches the configured label or serial")
        if len(matches) > 1:
            raise HsmFailure("several HSM tokens match the configuration; add 'serial' to select one")
        return matches[0]

    def _disconnect_locked(self, *, finalize: bool) -> None:
        """Drop the session (logging out) and, with ``finalize``, the module; ignore errors."""
        session, self._session = self._session, None
        self._token = None
        self._keys.clear()
        if session is not None:
            with suppress(p11e.PKCS11Error):
                session.close()
        if finalize and self._lib is not None:
            with suppress(p11e.PKCS11Error):
                self._lib.finalize()
            self._lib = None

    def _private_key_locked(self, session: pkcs11.Session, hsm_id: bytes) -> _CachedKey:
        entry = self._keys.get(hsm_id)
        if entry is not None:
            return entry
        found = _find(session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: hsm_id})
        if not found:
            raise HsmFailure("the HSM holds no private key with this id")
        if len(found) > 1:
            raise HsmFailure("the HSM holds several private keys with this id")
        key = found[0]
        if not isinstance(key, SignMixin):
            raise HsmFailure("the HSM key with this id may not sign")
        entry = _CachedKey(key, _algorithm_of(key))
        self._keys[hsm_id] = entry
        return entry


# -- helpers over python-pkcs11 objects (called with the lock held) ----------------------------------


def _check_hsm_id(hsm_id: bytes) -> None:
    if not isinstance(hsm_id, bytes) or not 1 <= len(hsm_id) <= 255:
        raise InvalidArgument("an HSM key id is 1 to 255 bytes")


def _find(session: pkcs11.Session, template: dict[Attribute, Any]) -> list[pkcs11.Object]:
    # Drain the search completely, so that python-pkcs11 ends it (C_FindObjectsFinal) here, under the
    # lock, and not later from a garbage-collected iterator in whatever thread.
    return list(session.get_objects(template))


def _algorithm_of(key: pkcs11.Object) -> Algorithm | None:
    key_type = key[Attribute.KEY_TYPE]
    ec_params = key[Attribute.EC_PARAMS] if key_type == pkcs11.KeyType.EC else None
    modulus = key[Attribute.MODULUS] if key_type == pkcs11.KeyType.RSA else None
    return _keys.algorithm_of(key_type, ec_params, modulus)


def _public_key_der(public: pkcs11.Object, algorithm: Algorithm) -> bytes:
    if algorithm is Algorithm.RSA_3072_PSS_SHA256:
        return _keys.rsa_public_key_der(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])
    return _keys.ec_public_key_der(algorithm, public[Attribute.EC_POINT])


def _protection(private: pkcs11.Object, algorithm: Algorithm) -> KeyProtection:
    names = (
        Attribute.TOKEN,
        Attribute.PRIVATE,
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.NEVER_EXTRACTABLE,
    )
    values = private.get_attributes(list(names))
    try:
        private[_keys.secret_attribute(algorithm)]
        readable = True  # the value itself is dropped at once
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
