"""Bulk device registration: the RegisterDevices stream, with wrapped secrets, a bounded window and resume.

Transport ("wrapped", the default): the client makes a random AES-256 batch key, encrypts it to the
product's registration key (RSA-OAEP with SHA-1, MGF1-SHA-1 and an empty label, the OAEP parameters
SoftHSM2 implements; see devices.proto) and wraps each secret under it with AES key wrap (RFC 3394, 40 bytes
per 32-byte secret), so plaintext secrets never leave the client and are unwrapped only inside the server's
HSM. The batch key is overwritten when the call ends (best effort: the RSA binding takes a ``bytes`` copy
that Python cannot wipe). "plain" sends the 32 bytes as they are, protected by mutual TLS only.

Flow: the header, then ``DeviceRows`` messages of ``batch_size`` rows. The server answers each message with
one response once its rows are committed, in order. At most ``window`` messages are sent and not yet
acknowledged, so the rows are read from the caller's iterable only as fast as the server commits them:
memory stays bounded for any number of rows and progress counts committed rows exactly.

Resume: when the stream fails with UNAVAILABLE, a new stream (same header, same batch key) sends the
unacknowledged messages again, then continues. That is safe because registering a device again with the same
secret is a no-op ("unchanged") on the server. A row therefore reaches ``on_outcome`` exactly once, though
a row the server committed just before the break comes back as "unchanged".

Threads: gRPC reads the request iterator on its own thread; the caller's rows are read there, under the lock
that also guards the window, so the request iterator of a failed attempt can never race the next one.
Callbacks run on the caller's thread.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from kmsapi.v1 import devices_pb2
from kmsctl import _wire
from kmsctl._models import (
    DeviceRegistration,
    RegistrationKeyInfo,
    RegistrationStatus,
    RegistrationSummary,
    RowOutcome,
    RowOutcomeCallback,
    RowProgressCallback,
)
from kmsctl._streams import IdleWatchdog, ResumeBudget
from kmsctl.errors import DeadlineExceededError, IntegrityError, UnavailableError

#: Rows per DeviceRows message the server accepts at most.
MAX_ROWS_PER_MESSAGE = 1000
DEFAULT_BATCH_SIZE = 500
#: DeviceRows messages in flight (sent, not yet acknowledged).
DEFAULT_WINDOW = 4
BATCH_KEY_SIZE = 32
_MIN_RSA_BITS = 3072

if TYPE_CHECKING:
    _Rpc = grpc.StreamStreamMultiCallable[
        devices_pb2.RegisterDevicesRequest, devices_pb2.RegisterDevicesResponse
    ]


def load_registration_key(registration_key: RegistrationKeyInfo) -> rsa.RSAPublicKey:
    """The public key of a registration key; ``IntegrityError`` unless it is RSA of at least 3072 bits."""
    try:
        public_key = serialization.load_pem_public_key(registration_key.pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as error:
        raise IntegrityError(f"the server's registration key does not parse: {error}") from error
    if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < _MIN_RSA_BITS:
        raise IntegrityError(
            f"the server's registration key {registration_key.key_version} is not an RSA key of at "
            f"least {_MIN_RSA_BITS} bits; refusing to wrap secrets to it"
        )
    return public_key


class BatchKey:
    """A random AES-256 batch key, encrypted to the registration key (``wrapped``); ``wipe()`` overwrites
    it."""

    def __init__(self, registration_key: RegistrationKeyInfo) -> None:
        public_key = load_registration_key(registration_key)
        self.key_version = registration_key.key_version
        self._key = bytearray(secrets.token_bytes(BATCH_KEY_SIZE))
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
        self.wrapped = public_key.encrypt(bytes(self._key), oaep)

    def wrap(self, secret: bytes) -> bytes:
        """The secret wrapped with AES key wrap (RFC 3394): 40 bytes for 32."""
        return aes_key_wrap(self._key, bytes(secret))

    def wipe(self) -> None:
        self._key[:] = bytes(len(self._key))


@dataclass
class _Batch:
    request: devices_pb2.RegisterDevicesRequest
    rows: list[tuple[int, str]]  # (row number, device id), to check the acknowledgement against


class _Attempt:
    """One RegisterDevices call: its request iterator and anything that iterator raised."""

    def __init__(self, stream: Registration, generation: int) -> None:
        self._stream = stream
        self._generation = generation
        self.error: BaseException | None = None
        self._call: grpc.Call | None = None
        self._call_set = threading.Event()

    def set_call(self, call: grpc.Call) -> None:
        self._call = call
        self._call_set.set()

    def requests(self) -> Iterator[devices_pb2.RegisterDevicesRequest]:
        try:
            yield from self._stream.requests(self._generation)
        except Exception as error:  # noqa: BLE001 -- handed to the caller's thread, which re-raises it
            # gRPC would log the exception and cancel the call as UNKNOWN; keep it for the caller instead.
            self.error = error
            self._call_set.wait()
            assert self._call is not None
            self._call.cancel()


class Registration:
    """Runs one ``register_devices`` call (see the module docstring)."""

    def __init__(
        self,
        rpc: _Rpc,
        header: devices_pb2.RegisterDevicesHeader,
        rows: Iterable[DeviceRegistration],
        batch_key: BatchKey | None,
        *,
        batch_size: int,
        window: int,
        progress: RowProgressCallback | None,
        on_outcome: RowOutcomeCallback | None,
        budget: ResumeBudget,
        idle_timeout: float,
    ) -> None:
        self._rpc = rpc
        self._header = devices_pb2.RegisterDevicesRequest(header=header)
        self._total = len(rows) if isinstance(rows, Sized) else None
        self._source = iter(rows)
        self._batch_key = batch_key
        self._batch_size = batch_size
        self._window = window
        self._progress = progress
        self._on_outcome = on_outcome
        self._budget = budget
        self._idle_timeout = idle_timeout
        self._lock = threading.Condition()
        self._generation = 0
        self._pending: deque[_Batch] = deque()  # sent, not acknowledged (guarded by _lock)
        self._exhausted = False  # every row read from the source (guarded by _lock)
        self._position = 0  # rows read from the source
        self._watchdog: IdleWatchdog | None = None
        self._done = 0
        self._created = 0
        self._unchanged = 0
        self._reprovisioned = 0
        self._rejected: list[RowOutcome] = []

    def run(self) -> RegistrationSummary:
        if self._progress is not None:
            self._progress(0, self._total)
        while True:
            before = self._done
            try:
                self._attempt()
                break
            except UnavailableError as error:
                self._budget.failed(error, progressed=self._done > before)
        return RegistrationSummary(
            created=self._created,
            unchanged=self._unchanged,
            rejected=self._rejected,
            transport_key_version=self._batch_key.key_version if self._batch_key is not None else "",
            reprovisioned=self._reprovisioned,
        )

    # -- the caller's thread -----------------------------------------------------------------------------

    def _attempt(self) -> None:
        with self._lock:
            self._generation += 1
            attempt = _Attempt(self, self._generation)
        call = self._rpc(attempt.requests())
        attempt.set_call(call)
        watchdog = self._watchdog = IdleWatchdog(call.cancel, self._idle_timeout)
        try:
            for response in call:
                watchdog.poke()
                self._acknowledge(response)
            if attempt.error is not None:
                raise attempt.error
            with self._lock:
                if self._pending or not self._exhausted:
                    raise IntegrityError(
                        "the server ended the registration stream before acknowledging every row"
                    )
        except grpc.RpcError as error:
            if attempt.error is not None:
                raise attempt.error from None
            if watchdog.expired:
                raise DeadlineExceededError(
                    f"the server acknowledged nothing for {self._idle_timeout:g} seconds",
                    code="DEADLINE_EXCEEDED",
                ) from error
            raise _wire.translate(error) from error
        finally:
            watchdog.stop()
            with self._lock:
                self._generation += 1  # retires this attempt's request iterator
                self._lock.notify_all()
            call.cancel()

    def _acknowledge(self, response: devices_pb2.RegisterDevicesResponse) -> None:
        with self._lock:
            if not self._pending:
                raise IntegrityError("the server acknowledged rows that were not sent")
            batch = self._pending[0]
        outcomes = [_wire.row_outcome(outcome) for outcome in response.outcomes]
        if [outcome.row for outcome in outcomes] != [row for row, _ in batch.rows]:
            raise IntegrityError(
                f"the server acknowledged rows {_span(o.row for o in outcomes)}, "
                f"but rows {_span(row for row, _ in batch.rows)} were sent in that message"
            )
        for outcome, (_, device_id) in zip(outcomes, batch.rows, strict=True):
            if outcome.device_id and outcome.device_id != device_id:
                raise IntegrityError(
                    f"row {outcome.row}: the server acknowledged device {outcome.device_id!r}, "
                    f"{device_id!r} was sent"
                )
            if outcome.status is RegistrationStatus.UNSPECIFIED:
                raise IntegrityError(f"row {outcome.row}: the server did not say what it did with the row")
        with self._lock:
            self._pending.popleft()
            self._lock.notify_all()
        for outcome, (_, device_id) in zip(outcomes, batch.rows, strict=True):
            if not outcome.device_id:
                outcome = RowOutcome(outcome.row, device_id, outcome.status, outcome.code, outcome.message)
            if outcome.status is RegistrationStatus.CREATED:
                self._created += 1
            elif outcome.status is RegistrationStatus.UNCHANGED:
                self._unchanged += 1
            elif outcome.status is RegistrationStatus.REPROVISIONED:
                self._reprovisioned += 1
            else:
                self._rejected.append(outcome)
            if self._on_outcome is not None:
                self._on_outcome(outcome)
        self._done += len(outcomes)
        if self._progress is not None:
            self._progress(self._done, self._total)

    # -- gRPC's request thread -----------------------------------------------------------------------------

    def requests(self, generation: int) -> Iterator[devices_pb2.RegisterDevicesRequest]:
        """The requests of attempt ``generation``: the header, the unacknowledged messages of earlier
        attempts, then new messages, each added to the window before it is handed to gRPC."""
        yield self._header
        with self._lock:
            if generation != self._generation:
                return
            resend = [batch.request for batch in self._pending]
        yield from resend
        while True:
            with self._lock:
                while len(self._pending) >= self._window and generation == self._generation:
                    self._lock.wait()
                if generation != self._generation or self._exhausted:
                    return
                batch = self._next_batch()
                if batch is None:
                    return
                self._pending.append(batch)
            if self._watchdog is not None:
                self._watchdog.poke()
            yield batch.request

    def _next_batch(self) -> _Batch | None:
        rows = devices_pb2.DeviceRows()
        numbers: list[tuple[int, str]] = []
        for registration in self._source:
            self._position += 1
            number = registration.row if registration.row is not None else self._position
            secret = registration.secret
            rows.rows.add(
                row=number,
                device_id=registration.device_id,
                chip=registration.chip,
                secret=self._batch_key.wrap(secret) if self._batch_key is not None else bytes(secret),
                ecies_public_key=_sec1(registration.ecies_public_key),
            )
            numbers.append((number, registration.device_id))
            if len(numbers) == self._batch_size:
                break
        else:
            self._exhausted = True
        if not numbers:
            return None
        return _Batch(devices_pb2.RegisterDevicesRequest(devices=rows), numbers)


def _sec1(ecies_public_key: bytes | None) -> bytes:
    """The ECIES key as SEC1 uncompressed (04||X||Y, 65 bytes), the form every server version accepts."""
    if not ecies_public_key:
        return b""
    return b"\x04" + ecies_public_key if len(ecies_public_key) == 64 else bytes(ecies_public_key)


def _span(rows: Iterable[int]) -> str:
    numbers = list(rows)
    if not numbers:
        return "(none)"
    return f"{numbers[0]}-{numbers[-1]} ({len(numbers)})" if len(numbers) > 1 else str(numbers[0])
