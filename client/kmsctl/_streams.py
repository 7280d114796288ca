"""What the long-running streams (device registration, payload download) share: an idle deadline, and a
retry budget that a stream which keeps making progress does not use up.

A stream of a million rows or a payload over a slow link can take longer than any fixed deadline, so these
calls have none; instead ``IdleWatchdog`` cancels a call once nothing has moved in either direction for
``timeout`` seconds, and the caller reports DEADLINE_EXCEEDED. ``ResumeBudget`` allows
``RetryPolicy.max_attempts`` attempts in a row that end in UNAVAILABLE without progress; an attempt that
made progress (rows acknowledged, payload bytes received) starts the count again, since resuming it loses
nothing.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from kmsctl._retry import RetryPolicy
from kmsctl.errors import UnavailableError


class IdleWatchdog:
    """Calls ``cancel`` once ``poke`` has not been called for ``timeout`` seconds; ``stop`` ends it."""

    def __init__(self, cancel: Callable[[], object], timeout: float) -> None:
        self._cancel = cancel
        self._timeout = timeout
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self.expired = False
        self._thread = threading.Thread(target=self._watch, name="kmsctl-idle-watchdog", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while True:
            remaining = self._timeout - (time.monotonic() - self._last)
            if remaining <= 0:
                self.expired = True
                self._cancel()
                return
            if self._stopped.wait(remaining):
                return


class ResumeBudget:
    """Counts the attempts in a row that failed with UNAVAILABLE without progress, and sleeps between them
    as ``policy`` says; raises the last error once ``policy.max_attempts`` is reached."""

    def __init__(
        self,
        policy: RetryPolicy,
        rng: random.Random,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._policy = policy
        self._rng = rng
        self._sleep = sleep
        self._failures = 0
        self.resumes = 0

    def failed(self, error: UnavailableError, *, progressed: bool) -> None:
        """Account for a failed attempt: return to try again, or raise ``error`` (with the count)."""
        if progressed:
            self._failures = 0
        self._failures += 1
        if self._failures >= self._policy.max_attempts:
            suffix = f" (after {self._failures} attempts)" if self._failures > 1 else ""
            raise UnavailableError(f"{error.message}{suffix}") from error
        self.resumes += 1
        self._sleep(self._policy.backoff(self._failures, self._rng))
