"""grpc.health.v1: SERVING while the HSM answers, NOT_SERVING while it does not or during shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from grpc_health.v1 import health, health_pb2

log = logging.getLogger("kms.server")


class HsmHealth:
    """Probes the HSM every ``interval`` seconds and publishes the result for every service name."""

    def __init__(self, probe: Callable[[], bool], services: Sequence[str], interval: float) -> None:
        self.servicer = health.HealthServicer()
        self._probe = probe
        self._services = ("", *services)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hsm-health", daemon=True)
        self._serving: bool | None = None

    def start(self) -> None:
        self.check_now()
        self._thread.start()

    def check_now(self) -> bool:
        try:
            ok = self._probe()
        except Exception:
            log.exception("HSM probe failed")
            ok = False
        self._publish(ok)
        return ok

    def _publish(self, ok: bool) -> None:
        if ok != self._serving:
            log.log(logging.INFO if ok else logging.WARNING, "HSM %s", "reachable" if ok else "UNREACHABLE")
        self._serving = ok
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self._services:
            self.servicer.set(name, status)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check_now()

    def shutdown(self) -> None:
        """Stop probing and report NOT_SERVING, so load balancers drain this instance."""
        self._stop.set()
        self.servicer.enter_graceful_shutdown()
