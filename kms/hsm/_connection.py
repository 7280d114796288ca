"""The one connection to a PKCS#11 module: one lock, one login, one session, reconnection, handle cache.

Why every PKCS#11 call is behind one lock
-----------------------------------------
python-pkcs11 0.10.1 calls ``C_Initialize(NULL)``: no ``CKF_OS_LOCKING_OK``, no mutex callbacks. To the
module this promises that the application never calls it from two threads at once, and SoftHSM2 takes the
promise at its word and turns its own locking off. Yet python-pkcs11 releases the GIL around nearly every
call, so two Python threads can be inside the module together; on this project's machines that aborted the
interpreter with heap corruption (two threads signing, each with its own session) or a segmentation fault
(signing, key generation and token queries mixed on one session) within seconds. So every call into the
module goes through ``_PKCS11_LOCK``, one lock for the whole process, because the module's state is per
process, not per object. Code reaches the module only inside ``Connection.run`` (and ``open``, ``close``,
``probe``), which hold the lock. (python-pkcs11 ends an interrupted object search from ``__del__``; CPython
runs it while the exception unwinds, so that call is under the lock too.)

The cost: one operation in flight at a time. SoftHSM2 signs ECDSA P-256 in tens of microseconds, so one
thread is plenty; a network HSM is limited to one round trip at a time. If that is ever too slow, sign in
worker processes started with ``spawn`` (never ``fork`` after ``C_Initialize``), each initializing the
module and logging in itself.

Lifecycle
---------
``open()`` loads the module (``C_Initialize``), finds the one initialized token the configuration selects,
opens one read/write session and logs in once (PKCS#11 login state is per process and token: a second
login fails). Every operation uses that session. Key handles are cached by (``CKA_ID``, object class),
because searching a token is slow when it holds many objects (SoftHSM2 #711); a stale handle empties the
cache and the operation is run once more. ``close()`` logs out, closes the session and finalizes the
module. Only one open connection per module is allowed in a process, since closing one would log out and
finalize the other.

When the HSM goes away
----------------------
Device and session errors (``CKR_DEVICE_ERROR``, ``CKR_DEVICE_REMOVED``, ``CKR_SESSION_HANDLE_INVALID``,
``CKR_TOKEN_NOT_PRESENT``, ...) mark the connection broken and raise ``HsmUnavailable``. The next call
reconnects from scratch (finalize, initialize, find the token, new session, login) with a bounded number of
attempts and exponential backoff, holding the lock, since nothing else could use the HSM meanwhile.
Idempotent operations (``retry=True``) then run once more on the new session; the others (generating keys:
a retry could leave an orphan behind) raise. After a failed reconnection, calls fail fast with
``HsmUnavailable`` and ``probe()`` reports False until a cooldown has passed; then the next call or health
check tries again. A refused PIN is never tried again (``HsmFailure`` until ``close()`` and ``open()``):
HSMs lock the PIN after a few failures.

Errors a retry will not fix (missing key, mechanism refused, wrong PIN) raise ``HsmFailure``. Messages
never carry PKCS#11 return codes or paths; the python-pkcs11 exception is chained as the cause.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import pkcs11
from pkcs11 import Attribute, ObjectClass, TokenFlag
from pkcs11 import exceptions as p11e

from kms.domain.errors import HsmFailure, HsmUnavailable, KmsError
from kms.domain.keys import Algorithm
from kms.hsm import _objects
from kms.hsm.config import HsmConfig

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Library  # noqa: N812

_log = logging.getLogger("kms.hsm")

_PKCS11_LOCK = threading.Lock()
"""Serializes every PKCS#11 call in the process (see the module docstring)."""

_MODULES_IN_USE: set[str] = set()
"""Real paths of the modules an open ``Connection`` owns; guarded by ``_PKCS11_LOCK``."""

UNAVAILABLE: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.DeviceRemoved,
    p11e.SessionClosed,
    p11e.SessionCount,
    p11e.SessionHandleInvalid,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
)
"""Errors after which the session is suspect and reconnecting may help.

``CKR_GENERAL_ERROR`` is not among them: SoftHSM2 returns it for an unwrap whose integrity check fails (a
caller's malformed blob), with the session intact. After a general error the token is asked for its info;
only if that fails too is the connection treated as lost (``Connection._is_outage_locked``).
"""

_UNREACHABLE = (*UNAVAILABLE, p11e.GeneralError)
"""Errors that, while connecting or probing the token (no caller input involved), mean it is out of reach."""

_STALE_HANDLE = (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid)
_PIN_REFUSED = (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinLocked, p11e.PinExpired)
_CLASS_NAMES = {
    ObjectClass.PRIVATE_KEY: "private key",
    ObjectClass.PUBLIC_KEY: "public key",
    ObjectClass.SECRET_KEY: "secret key",
}

T = TypeVar("T")


@dataclass(frozen=True)
class CachedKey:
    """A key object found in the token, and which of the service's algorithms it is for."""

    key: pkcs11.Object
    algorithm: Algorithm | None


class Connection:
    """The process's connection to one token of one PKCS#11 module. Thread-safe."""

    def __init__(
        self, config: HsmConfig, *, reopen_attempts: int, reopen_backoff: float, reopen_cooldown: float
    ) -> None:
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
        self._keys: dict[tuple[bytes, ObjectClass], CachedKey] = {}

    def open(self) -> None:
        """Load the module, open a session on the token and log in. Idempotent.

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
                self._disconnect_locked()
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
            self._disconnect_locked()
            if self._module_key is not None:
                _MODULES_IN_USE.discard(self._module_key)
            self._module_key = None
            self._opened = False

    def run(self, operation: Callable[[pkcs11.Session], T], what: str, *, retry: bool) -> T:
        """Run ``operation`` on the session, under the lock, translating python-pkcs11's exceptions.

        ``what`` completes "the HSM refused to ..." in error messages. A stale cached handle empties the
        cache and runs the operation once more. A device or session error marks the connection broken;
        with ``retry`` the connection is reopened and the operation run once more, without it
        ``HsmUnavailable`` is raised. ``KmsError`` raised by the operation passes through.
        """
        with _PKCS11_LOCK:
            session = self._session_locked()
            try:
                return operation(session)
            except _STALE_HANDLE:
                self._keys.clear()
            except p11e.PKCS11Error as e:
                if not self._is_outage_locked(e):
                    raise HsmFailure(f"the HSM refused to {what}") from e
                self._mark_broken_locked(e)
                if not retry:
                    raise HsmUnavailable(f"the HSM became unavailable while trying to {what}") from e
                session = self._reopen_locked()
            try:
                return operation(session)
            except p11e.PKCS11Error as e:
                if self._is_outage_locked(e):
                    self._mark_broken_locked(e)
                    raise HsmUnavailable(f"the HSM became unavailable while trying to {what}") from e
                raise HsmFailure(f"the HSM refused to {what}") from e

    def probe(self) -> bool:
        """True if the token answers ``C_GetTokenInfo`` now, initialized and with its user PIN not locked.

        While the connection is broken this tries to reconnect once the cooldown has passed.
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
                flags = self._token.slot.get_token().flags
            except p11e.PKCS11Error as e:
                if isinstance(e, _UNREACHABLE):
                    self._mark_broken_locked(e)
                return False
            return bool(flags & TokenFlag.TOKEN_INITIALIZED) and not flags & TokenFlag.USER_PIN_LOCKED

    # -- for operations (called inside run(), so with the lock held) -------------------------------------

    def key(self, session: pkcs11.Session, hsm_id: bytes, object_class: ObjectClass) -> CachedKey:
        """The one key object of this class with this CKA_ID (cached); ``HsmFailure`` if none or several."""
        entry = self._keys.get((hsm_id, object_class))
        if entry is not None:
            return entry
        found = _objects.find(session, {Attribute.CLASS: object_class, Attribute.ID: hsm_id})
        name = _CLASS_NAMES.get(object_class, "object")
        if not found:
            raise HsmFailure(f"the HSM holds no {name} with this id")
        if len(found) > 1:
            raise HsmFailure(f"the HSM holds several {name}s with this id")
        entry = CachedKey(found[0], _objects.algorithm_of(found[0]))
        self._keys[(hsm_id, object_class)] = entry
        return entry

    def forget(self, hsm_id: bytes) -> None:
        for cached in [k for k in self._keys if k[0] == hsm_id]:
            del self._keys[cached]

    # -- internals (lock held) ---------------------------------------------------------------------------

    def _session_locked(self) -> pkcs11.Session:
        if not self._opened:
            raise HsmUnavailable("the HSM connection is not open")
        if self._broken or self._session is None:
            return self._reopen_locked()
        return self._session

    def _is_outage_locked(self, error: p11e.PKCS11Error) -> bool:
        """Whether an error means the HSM or the session is gone (rather than this operation refused)."""
        if isinstance(error, UNAVAILABLE):
            return True
        if not isinstance(error, p11e.GeneralError) or self._token is None:
            return False
        try:
            self._token.slot.get_token()
        except p11e.PKCS11Error:
            return True
        return False

    def _mark_broken_locked(self, error: BaseException) -> None:
        if not self._broken:
            _log.warning("HSM connection lost (%s); will reconnect", type(error).__name__)
        self._broken = True
        self._keys.clear()

    def _reopen_locked(self) -> pkcs11.Session:
        """Reconnect from scratch, with bounded attempts; raise ``HsmUnavailable`` if it cannot.

        A refused PIN is not tried again until ``close()`` and ``open()``. Other refusals (a module that no
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
            self._disconnect_locked()
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
            "HSM reconnection failed (%s); next try in %.1f s", type(cause).__name__, self._reopen_cooldown
        )
        raise HsmUnavailable("the HSM is unavailable; reconnection failed") from last

    def _connect_locked(self) -> pkcs11.Session:
        pin = self._config.read_pin()
        try:
            lib = pkcs11.lib(str(self._config.module_path))
        except p11e.PKCS11Error as e:
            if isinstance(e, _UNREACHABLE):
                raise HsmUnavailable("the PKCS#11 module cannot reach the HSM") from e
            raise HsmFailure("the PKCS#11 module cannot be loaded or initialized") from e
        self._lib = lib
        try:
            token = self._find_token_locked(lib)
            try:
                session = token.open(rw=True, user_pin=pin)
            except p11e.UserAlreadyLoggedIn:
                # Login is per process and token: this process is logged in already.
                session = token.open(rw=True)
        except _PIN_REFUSED as e:
            self._pin_refused = True
            raise HsmFailure("the HSM refused the PIN") from e
        except p11e.PKCS11Error as e:
            if isinstance(e, _UNREACHABLE):
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

    def _disconnect_locked(self) -> None:
        """Drop the session (logging out) and finalize the module; ignore errors."""
        session, self._session = self._session, None
        self._token = None
        self._keys.clear()
        if session is not None:
            with suppress(p11e.PKCS11Error):
                session.close()
        if self._lib is not None:
            with suppress(p11e.PKCS11Error):
                self._lib.finalize()
            self._lib = None

    def kill_session_for_tests(self) -> None:
        """Close the session behind the connection's back, as an HSM outage would (fault injection)."""
        with _PKCS11_LOCK:
            if self._session is not None:
                with suppress(p11e.PKCS11Error):
                    self._session.close()
