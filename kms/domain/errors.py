"""Domain errors. Every error the service reports to a caller is one of these.

Each class corresponds to one gRPC status (the mapping lives in ``kms.server.errors`` only); the message is
written for a person and never contains secrets, SQL, PKCS#11 return codes or file paths. Adapters translate
foreign exceptions where they enter (``raise HsmUnavailable(...) from e``).
"""


class KmsError(Exception):
    """Base class of every error the service reports."""


class InvalidArgument(KmsError):
    """The request or the data it carries is malformed."""


class InvalidImage(InvalidArgument):
    """An uploaded firmware image is malformed; the message says what and where."""


class NotFound(KmsError):
    """A named product, key, key version or release does not exist."""


class AlreadyExists(KmsError):
    """An object with this name exists with different content."""


class FailedPrecondition(KmsError):
    """A rule refuses the request in the current state (anti-rollback floor, chip rules, key state)."""


class LimitExceeded(KmsError):
    """A documented limit (size, count, rate) was exceeded."""


class PermissionDenied(KmsError):
    """The authenticated caller may not perform this operation."""


class DataLoss(KmsError):
    """Data arrived corrupted (a checksum the caller supplied does not match)."""


class Unavailable(KmsError):
    """A dependency (HSM, storage) cannot serve now; the operation may succeed if retried later."""


class HsmUnavailable(Unavailable):
    """The HSM cannot be reached or failed; the operation may succeed if retried later."""


class HsmFailure(KmsError):
    """The HSM refused an operation in a way a retry will not fix (missing key, wrong mechanism)."""


class Unauthenticated(KmsError):
    """The caller presented no usable identity."""


class OutOfRange(KmsError):
    """A position or range lies outside the object (for example a resume offset past the end)."""
