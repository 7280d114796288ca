"""The server's periodic key lifecycle work: destructions that have fallen due, and scheduled rotations.

``LifecycleScheduler`` runs ``KeyLifecycle.destroy_due(now)`` and then ``KeyLifecycle.rotate_due(now)`` on a
daemon thread: once when started, then every ``interval`` seconds until ``stop()``. Both are safe to run
while officers' requests run, and in several server processes at once (see ``kms.service.lifecycle``).

The thread never dies of an error. The two sweeps run independently, so a failing destruction does not hold
up rotations; a version or key that fails (the HSM unreachable, say) is logged by ``KeyLifecycle`` and
stays due, so the next run tries it again; anything else a sweep raises (the database unavailable, a bug) is
logged here with its traceback, and the next run starts afresh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from kms.domain.errors import KmsError
from kms.service.lifecycle import KeyLifecycle, SweepResult

DEFAULT_INTERVAL = 60.0
"""Seconds between runs: how late after its due time a destruction or a scheduled rotation happens."""

_log = logging.getLogger("kms.lifecycle")


class LifecycleScheduler:
    """Runs ``lifecycle``'s scheduled work every ``interval`` seconds on a thread of its own."""

    def __init__(
        self,
        lifecycle: KeyLifecycle,
        *,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self._lifecycle = lifecycle
        self._interval = interval
        self._clock = clock
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; the first run happens at once."""
        if self._thread is not None:
            raise RuntimeError("the lifecycle scheduler was started already")
        self._thread = threading.Thread(target=self._loop, name="lifecycle-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop and wait up to ``timeout`` seconds (None: for ever) for a run in progress
        to finish. Idempotent; a scheduler never started just stays stopped."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> tuple[SweepResult | None, SweepResult | None]:
        """One run: (destructions, rotations); None for a sweep that failed as a whole (logged)."""
        now = self._clock()
        return (
            self._sweep("destruction", self._lifecycle.destroy_due, now),
            self._sweep("rotation", self._lifecycle.rotate_due, now),
        )

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.run_once()
            self._stopping.wait(self._interval)

    def _sweep(
        self, what: str, sweep: Callable[[datetime], SweepResult], now: datetime
    ) -> SweepResult | None:
        try:
            result = sweep(now)
        except KmsError as e:
            _log.warning("scheduled %s failed: %s; next try in %g s", what, e, self._interval)
            return None
        except Exception:  # noqa: BLE001 - the scheduler thread must outlive any failure; logged in full
            _log.exception("scheduled %s failed; next try in %g s", what, self._interval)
            return None
        if result.done:
            _log.info("scheduled %s done: %s", what, ", ".join(result.done))
        if result.failed:
            _log.warning(
                "scheduled %s failed for %s; next try in %g s",
                what,
                ", ".join(name for name, _error in result.failed),
                self._interval,
            )
        return result
