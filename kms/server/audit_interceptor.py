"""``AuditInterceptor``: every RPC, of all four kinds, becomes one durable audit record before it is answered.

What is recorded
----------------
One ``kms.domain.audit.AuditEvent`` per call: the time the call arrived; the caller's identity and role from
its client certificate (both empty when it could not be authenticated); the operation, the full method name;
the outcome, the name of the status code the caller gets (``OK``, ``PERMISSION_DENIED``, ``CANCELLED``...);
the request id; and what the servicer noted about the object acted on (``note(product=..., resource=...,
key_version=...)``). The request id is the caller's ``x-request-id`` metadata when it is 1-128 visible ASCII
characters, else a new random one; it goes back to the caller in the trailing metadata ``x-request-id``.
Servicers note identifiers only, never a secret, a digest or a message; text that the record format
refuses (control characters, more than 1,024 bytes) is escaped and shortened here rather than losing the
record.

When
----
The record is appended (``SqliteAuditLog.append``: committed durably, with group commit) before the status
goes out. For a unary response the response message goes out with the status, so the caller sees nothing
before the record is durable. A streaming response is recorded when its iterator ends, before gRPC sends the
status: messages already streamed have reached the caller, but the call counts as successful only with its
OK status, which follows the record. If the append fails the caller gets UNAVAILABLE, never an unrecorded
success. A call whose client went away (or whose deadline passed) is recorded as ``CANCELLED`` (or
``DEADLINE_EXCEEDED``) when the servicer's code returns or its response stream is closed.

Order with the authorization interceptor
----------------------------------------
gRPC applies server interceptors in list order, the first outermost: ``interceptors=[AuditInterceptor(log),
AuthorizationInterceptor()]`` makes the audit wrapper run around the authorization check, so refused calls
(``UNAUTHENTICATED``, ``PERMISSION_DENIED``) are recorded too. A method the server does not implement is
recorded as ``UNIMPLEMENTED``.

Context
-------
``note`` finds the current call through a ``contextvars.ContextVar``. grpcio (1.60 and later) runs each RPC,
its behavior and the iteration of its response stream in a ``contextvars.Context`` of its own, on one pool
thread; the interceptor sets a fresh ``AuditNote`` when the call starts, so notes never leak between calls
even with an older grpcio that reuses a thread's context. Outside an audited call ``note`` does nothing, so
servicers work unchanged in unit tests without the interceptor.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

import grpc

from kms.domain.audit import MAX_TEXT_BYTES, AuditEvent
from kms.domain.errors import KmsError, Unauthenticated
from kms.server.auth import caller_from_auth_context

log = logging.getLogger("kms.audit")

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[!-~]{1,128}")
# What kms.domain.audit refuses in a text field: C0/C1 controls, DEL, separators, bidi controls, surrogates.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNRECORDED = "the call could not be recorded in the audit log, so its result is withheld; retry later"


class AuditSink(Protocol):
    """Where events go: ``SqliteAuditLog`` (``append`` returns once the record is durable)."""

    def append(self, event: AuditEvent) -> object: ...


@dataclass
class AuditNote:
    """What the servicer says about the object of the current call (identifiers only)."""

    product: str = ""
    resource: str = ""
    key_version: str = ""


_CURRENT: contextvars.ContextVar[AuditNote | None] = contextvars.ContextVar("kms_audit_note", default=None)


def audit_context() -> AuditNote | None:
    """The note of the RPC being served on this thread, or None outside an audited call."""
    return _CURRENT.get()


def note(*, product: str | None = None, resource: str | None = None, key_version: str | None = None) -> None:
    """Record what the current call acts on; a value given again replaces the earlier one."""
    current = _CURRENT.get()
    if current is None:
        return
    if product is not None:
        current.product = product
    if resource is not None:
        current.resource = resource
    if key_version is not None:
        current.key_version = key_version


def safe_text(value: str) -> str:
    """``value`` as a record text field accepts it: forbidden characters escaped, at most 1,024 bytes."""
    if _FORBIDDEN.search(value):
        value = _FORBIDDEN.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    data = value.encode("utf-8")
    if len(data) > MAX_TEXT_BYTES:
        value = data[: MAX_TEXT_BYTES - 3].decode("utf-8", "ignore") + "..."
    return value


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _new_request_id() -> str:
    return secrets.token_hex(16)


@dataclass
class _Call:
    """One call being served: who, what, since when; ``recorded`` once its record is appended."""

    time: datetime
    caller: str
    role: str
    operation: str
    request_id: str
    note: AuditNote
    recorded: bool = False


class AuditInterceptor(grpc.ServerInterceptor):
    """Records every call in ``audit_log`` (see the module documentation). Put it first in the list."""

    def __init__(
        self,
        audit_log: AuditSink,
        *,
        clock: Callable[[], datetime] = _utc_now,
        new_request_id: Callable[[], str] = _new_request_id,
    ) -> None:
        self._log = audit_log
        self._clock = clock
        self._new_request_id = new_request_id

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:
            return self._unimplemented(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    # -- the wrappers --------------------------------------------------------------------------------

    def _unary(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def audited(request: Any, context: grpc.ServicerContext) -> Any:
            call = self._start(method, context)
            try:
                response = behavior(request, context)
            except BaseException:
                self._finish(call, context, failed=True)
                raise
            self._finish(call, context, failed=False)
            return response

        return audited

    def _streaming(
        self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[..., Iterator[Any]]:
        def audited(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._start(method, context)
            responses: Iterator[Any] | None = None
            try:
                responses = behavior(request, context)
                yield from responses
            except GeneratorExit:
                # gRPC stopped reading: the client went away. Record it (not raised: nobody listens).
                self._finish(call, context, failed=True, cancelled=True, raise_on_failure=False)
                raise
            except BaseException:
                self._finish(call, context, failed=True)
                raise
            self._finish(call, context, failed=False)

        return audited

    def _unimplemented(self, method: str) -> grpc.RpcMethodHandler[Any, Any]:
        def refuse(requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            yield  # pragma: no cover - a generator, so that gRPC calls it before any request arrives

        # Bidirectional streaming: gRPC calls the behavior at once, for whatever the client sends (no
        # deserializer: no request is parsed), and the status goes out before anything is read.
        return grpc.stream_stream_rpc_method_handler(self._streaming(method, refuse))

    # -- recording -----------------------------------------------------------------------------------

    def _start(self, method: str, context: grpc.ServicerContext) -> _Call:
        try:
            caller = caller_from_auth_context(cast(Mapping[str, Any], context.auth_context()))
            identity, role = caller.identity, caller.role.value
        except Unauthenticated:
            identity, role = "", ""
        request_id = ""
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
                request_id = value
                break
        current = AuditNote()
        _CURRENT.set(current)
        return _Call(
            time=self._clock(),
            caller=safe_text(identity),
            role=safe_text(role),
            operation=safe_text(method) or "?",
            request_id=request_id or self._new_request_id(),
            note=current,
        )

    def _finish(
        self,
        call: _Call,
        context: grpc.ServicerContext,
        *,
        failed: bool,
        cancelled: bool = False,
        raise_on_failure: bool = True,
    ) -> None:
        """Append the call's record; if that fails, abort with UNAVAILABLE (unless ``raise_on_failure``)."""
        if call.recorded:
            return
        call.recorded = True
        outcome = _outcome(context, failed=failed, cancelled=cancelled)
        event = AuditEvent(
            time=call.time,
            caller=call.caller,
            role=call.role,
            operation=call.operation,
            outcome=outcome,
            request_id=call.request_id,
            product=safe_text(call.note.product),
            resource=safe_text(call.note.resource),
            key_version=safe_text(call.note.key_version),
        )
        try:
            self._log.append(event)
        except KmsError as e:
            log.error(
                "%s %s (%s) not recorded in the audit log: %s", call.operation, outcome, call.request_id, e
            )
            if raise_on_failure:
                context.abort(grpc.StatusCode.UNAVAILABLE, _UNRECORDED)
            return
        metadata = tuple(context.trailing_metadata() or ())
        context.set_trailing_metadata((*metadata, (REQUEST_ID_KEY, call.request_id)))


def _outcome(context: grpc.ServicerContext, *, failed: bool, cancelled: bool) -> str:
    """The status the caller gets, as gRPC will decide it after the behavior returned or raised."""
    if cancelled or not context.is_active():
        return "DEADLINE_EXCEEDED" if context.time_remaining() <= 0 else "CANCELLED"
    code = cast(Any, context).code()  # types-grpcio lacks ServicerContext.code
    if isinstance(code, grpc.StatusCode):  # abort() or set_code(): gRPC sends that code
        return code.name
    return "UNKNOWN" if failed else "OK"  # an exception without abort() becomes UNKNOWN
