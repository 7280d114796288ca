"""The server's background KEK rewrap: ``KekRotationRunner`` runs rotation jobs on a daemon thread.

When started it resumes every job left unfinished (by a crash, a kill -9 or a stop), then waits for new
ones: ``wake()`` (called after ``StartKekRotation``) makes it look at once, otherwise it looks every
``interval`` seconds, which also picks up jobs started by another server process on the same database.
A job that fails (the HSM unreachable, a KEK version disabled) is logged and tried again at the next look;
the thread never dies of an error. ``stop()`` makes the job in progress return after its current batch.
"""

from __future__ import annotations

import logging
import threading

from kms.domain.errors import KmsError
from kms.service.kek_rotation import DEFAULT_BATCH, KekRotationService

DEFAULT_INTERVAL = 30.0
_log = logging.getLogger("kms.kek_rotation")


class KekRotationRunner:
    def __init__(
        self, service: KekRotationService, *, interval: float = DEFAULT_INTERVAL, batch: int = DEFAULT_BATCH
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self._service = service
        self._interval = interval
        self._batch = batch
        self._stopping = threading.Event()
        self._woken = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; unfinished jobs are resumed at once."""
        if self._thread is not None:
            raise RuntimeError("the KEK rotation runner was started already")
        self._thread = threading.Thread(target=self._loop, name="kek-rotation", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for new jobs now."""
        self._woken.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current batch; wait up to ``timeout`` seconds. Idempotent."""
        self._stopping.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_once(self) -> int:
        """Run every unfinished job to its end (or until stopped); return how many finished."""
        finished = 0
        try:
            jobs = self._service.unfinished()
        except KmsError as e:
            _log.warning("cannot read KEK rotation jobs: %s; next try in %g s", e, self._interval)
            return 0
        for job in jobs:
            if self._stopping.is_set():
                break
            try:
                status = self._service.run(job, batch=self._batch, stopping=self._stopping.is_set)
            except KmsError as e:
                _log.warning(
                    "KEK rotation of keys/%s to version %d interrupted: %s; next try in %g s",
                    job.kek_key_id,
                    job.to_version,
                    e,
                    self._interval,
                )
            except Exception:  # noqa: BLE001 - the runner thread must outlive any failure; logged in full
                _log.exception(
                    "KEK rotation of keys/%s failed; next try in %g s", job.kek_key_id, self._interval
                )
            else:
                finished += status.rotation.finished
        return finished

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._woken.clear()
            self.run_once()
            self._woken.wait(self._interval)
