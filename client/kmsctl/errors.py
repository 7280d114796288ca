"""Errors raised by the kmsctl client library.

Every failure the library reports is a ``KmsClientError``; no ``grpc`` exception escapes it. Errors the
server reports keep its message (``str(error)``) and chain the original ``grpc.RpcError`` as ``__cause__``.
Two kinds come from the client itself: ``InvalidArgumentError`` for arguments refused before any call (a
digest of the wrong length), and ``IntegrityError`` when a response fails a client-side check (a CRC32C or
SHA-256 that does not match, a stream that ends early). Local files the caller names are read and written
with ordinary Python I/O, so their failures are ``OSError``.

``code`` is the name of the gRPC status the error stands for (``"NOT_FOUND"``), or ``"DATA_LOSS"`` for an
``IntegrityError``; callers that only need a category can use it instead of the class.
"""

from __future__ import annotations

from typing import ClassVar


class KmsClientError(Exception):
    """Base class of every error the client library raises."""

    default_code: ClassVar[str] = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code


class InvalidArgumentError(KmsClientError):
    """The request or the data it carries is malformed (the server or the client refused it)."""

    default_code = "INVALID_ARGUMENT"


class NotFoundError(KmsClientError):
    """The named product, key or key version does not exist."""

    default_code = "NOT_FOUND"


class AlreadyExistsError(KmsClientError):
    """An object with this name exists already."""

    default_code = "ALREADY_EXISTS"


class FailedPreconditionError(KmsClientError):
    """A rule refuses the request in the current state (anti-rollback floor, chip rules, key state)."""

    default_code = "FAILED_PRECONDITION"


class PermissionDeniedError(KmsClientError):
    """The caller's identity may not perform this operation."""

    default_code = "PERMISSION_DENIED"


class UnauthenticatedError(KmsClientError):
    """The server could not establish who the caller is."""

    default_code = "UNAUTHENTICATED"


class ResourceExhaustedError(KmsClientError):
    """A documented server limit was exceeded (image size, concurrent calls)."""

    default_code = "RESOURCE_EXHAUSTED"


class UnavailableError(KmsClientError):
    """The server or its HSM could not be reached, after every retry the client was allowed."""

    default_code = "UNAVAILABLE"


class DeadlineExceededError(KmsClientError):
    """The call did not finish before its deadline. It is not retried: it may have taken effect."""

    default_code = "DEADLINE_EXCEEDED"


class UnimplementedError(KmsClientError):
    """The server does not implement this method (it is older than the client)."""

    default_code = "UNIMPLEMENTED"


class DataLossError(KmsClientError):
    """Data was corrupted on the way (reported by the server, or detected by the client)."""

    default_code = "DATA_LOSS"


class IntegrityError(DataLossError):
    """A response failed a client-side integrity check; its content must not be used."""


class ServerError(KmsClientError):
    """Any other status (INTERNAL, UNKNOWN, ABORTED, CANCELLED); ``code`` says which."""

    default_code = "INTERNAL"
