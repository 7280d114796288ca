"""KEK rotation: moving every stored device secret from older versions of a product's KEK to a new one.

A rotation is a *job*: the KEK key, the version it moves secrets to (``to_version``, made the primary when
the job starts, so new registrations use it at once), the primary before (``from_version``, informative),
who started it and when, when it finished, and how many secrets it rewrapped. The job moves every device
secret of the key under a version *below* ``to_version`` (so a job left behind by an earlier, interrupted
rotation is covered too, and a still newer version made meanwhile is never touched).

Each secret is rewrapped inside the HSM (unwrapped under its old KEK version into a session object, wrapped
under the new one) and stored with a compare-and-set: a row changes only if it still holds the blob and
version that were read. Re-running a batch after a crash therefore changes nothing twice, and the progress
counter moves in the same transaction as the rows, so it survives any crash exactly.

While the job runs both versions stay enabled: each device row names the version its blob is wrapped
under, so payloads keep being served from old and new rows alike. A KEK version may be scheduled for
destruction only when no device secret depends on it any more (``kms.service.kek_rotation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class StoredSecret:
    """One device's wrapped secret as stored: the KEK version it is wrapped under and the blob."""

    device_id: str
    kek_version: int
    blob: bytes = field(repr=False)


@dataclass(frozen=True)
class Rewrap:
    """A device secret rewrapped from ``old`` (as read) to ``new_version`` (``new_blob``)."""

    old: StoredSecret
    new_version: int
    new_blob: bytes = field(repr=False)


@dataclass(frozen=True)
class KekRotation:
    """A KEK rotation job (see the module docstring)."""

    kek_key_id: str
    product: str
    from_version: int
    to_version: int
    started_by: str
    started_at: datetime
    finished_at: datetime | None = None
    rewrapped: int = 0

    @property
    def finished(self) -> bool:
        return self.finished_at is not None


@dataclass(frozen=True)
class KekRotationStatus:
    """A job with its live counts: ``remaining`` secrets still under a version below ``to_version``."""

    rotation: KekRotation
    remaining: int

    @property
    def total(self) -> int:
        return self.rotation.rewrapped + self.remaining
