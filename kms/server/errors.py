"""The one place where domain errors become gRPC status codes.

A ``KmsError`` is reported with its class's status and its message (written for a person, free of internal
detail). Anything else is a bug: it is logged with its traceback under a random incident id, and the caller
gets INTERNAL with that id only, never ``str(e)``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from kms.domain import errors

log = logging.getLogger("kms.server")

STATUS: list[tuple[type[errors.KmsError], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.HsmFailure, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_of(error: errors.KmsError) -> grpc.StatusCode:
    for cls, code in STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, error: BaseException) -> NoReturn:
    if isinstance(error, errors.KmsError):
        context.abort(status_of(error), str(error))
    incident = secrets.token_hex(6)
    log.error("internal error, incident %s", incident, exc_info=error)
    context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); the server log has details"
    )
    raise AssertionError("unreachable")


F = TypeVar("F", bound=Callable[..., Any])


def translate_errors(method: F) -> F:
    """Decorate a servicer method (plain or generator) so errors map to status codes.

    Servicer code never calls ``context.abort`` itself: it raises ``KmsError`` subclasses, so every
    exception seen here is either a domain error or a bug.
    """
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as e:  # noqa: BLE001 - the one place foreign errors become statuses
                _abort(context, e)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as e:  # noqa: BLE001 - the one place foreign errors become statuses
            _abort(context, e)

    return unary  # type: ignore[return-value]
