"""Retries with exponential backoff and full jitter, for UNAVAILABLE only.

UNAVAILABLE means the request was not processed (the server or its HSM could not be reached), so it is safe
to repeat; image signing is also idempotent on the server (the same image returns the stored release).
Nothing else is retried: DEADLINE_EXCEEDED may have taken effect, and the other codes will not change.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kmsctl.errors import UnavailableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a call that failed with UNAVAILABLE.

    ``max_attempts`` counts the first call (1 disables retries). Before retry *k* (1-based) the client
    sleeps a uniformly random time in ``[0, min(max_backoff, initial_backoff * multiplier**(k-1))]``.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be non-negative and the multiplier at least 1")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds to sleep before retry number ``retry`` (1 for the first retry)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return rng.uniform(0.0, ceiling)


def call_with_retry(
    attempt: Callable[[], T],
    policy: RetryPolicy,
    *,
    rng: random.Random,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``attempt`` until it returns or raises anything but ``UnavailableError``, at most
    ``policy.max_attempts`` times; the last ``UnavailableError`` says how many attempts were made."""
    for number in range(1, policy.max_attempts + 1):
        try:
            return attempt()
        except UnavailableError as error:
            if number == policy.max_attempts:
                suffix = f" (after {number} attempts)" if number > 1 else ""
                raise UnavailableError(f"{error.message}{suffix}") from error
            sleep(policy.backoff(number, rng))
    raise AssertionError("unreachable")  # pragma: no cover
