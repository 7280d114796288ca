"""A real KMS server for end-to-end tests: `kms init` and `kms serve` as subprocesses.

Everything is real: a fresh SoftHSM2 token (hsm/setup-softhsm.sh), the development PKI, a SQLite file, and
gRPC over mutual TLS on a free loopback port (the server binds port 0 and writes the port to a ready file).
Keys are created with `kms keys create`, also a subprocess, before the server starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kmsctl import KmsClient, RetryPolicy, SignedImage

KMS = [sys.executable, "-m", "kms.cli"]
KMSCTL = [sys.executable, "-m", "kmsctl"]


@dataclass(frozen=True)
class KeySpec:
    key_id: str
    product: str
    algorithm: str
    slot: int | None = 0
    purpose: str = "secure-boot-v2"


def run_kms(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*KMS, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if result.returncode != 0:
        raise AssertionError(f"kms {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


@dataclass
class RunningKms:
    state_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    keys: dict[str, KeySpec] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    @property
    def config(self) -> Path:
        return self.state_dir / "kms.toml"

    def credentials(self, role: str = "build-server") -> dict[str, Path]:
        pki = self.state_dir / "pki"
        return {
            "ca": pki / "ca.pem",
            "cert": pki / "clients" / f"{role}.pem",
            "key": pki / "clients" / f"{role}.key",
        }

    def client(self, role: str = "build-server", *, timeout: float = 60.0, attempts: int = 1) -> KmsClient:
        files = self.credentials(role)
        return KmsClient.from_files(
            self.target,
            ca=files["ca"],
            cert=files["cert"],
            key=files["key"],
            timeout=timeout,
            retries=RetryPolicy(max_attempts=attempts),
        )

    def kmsctl(
        self, *args: str, role: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the CLI as a subprocess against this server (as ``role``, or the command's default role)."""
        env = dict(os.environ, KMS_STATE_DIR=str(self.state_dir), KMSCTL_SERVER=self.target)
        return subprocess.run(
            [*KMSCTL, *args, *(["--identity", role] if role else [])],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def init_state(state_dir: Path, keys: Sequence[KeySpec], product_sets: Sequence[str] = ()) -> None:
    run_kms("init", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0")
    for product in product_sets:
        run_kms("keys", "create-product-set", "--config", str(state_dir / "kms.toml"), "--product", product)
    for spec in keys:
        args = [
            "keys",
            "create",
            "--config",
            str(state_dir / "kms.toml"),
            "--key-id",
            spec.key_id,
            "--product",
            spec.product,
            "--algorithm",
            spec.algorithm,
            "--purpose",
            spec.purpose,
        ]
        if spec.slot is not None:
            args += ["--slot", str(spec.slot)]
        run_kms(*args)


@contextmanager
def running_kms(
    state_dir: Path, keys: Sequence[KeySpec] = (), *, init: bool = True, product_sets: Sequence[str] = ()
) -> Iterator[RunningKms]:
    """Initialize ``state_dir`` (unless ``init`` is False) and run a server on it until the block ends."""
    if init:
        init_state(state_dir, keys, product_sets)
    ready = state_dir / f"ready-{time.monotonic_ns()}"
    log_path = state_dir / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*KMS, "serve", "--config", str(state_dir / "kms.toml"), "--ready-file", str(ready)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = RunningKms(state_dir, 0, process, log_path, {k.key_id: k for k in keys})
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if process.poll() is not None:
                raise AssertionError(f"kms serve exited {process.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"kms serve did not become ready in 60 s:\n{server.log()}")
            time.sleep(0.05)
        server.port = int(ready.read_text())
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def image_bytes(signed: SignedImage) -> bytes:
    """The signed image of a ``sign_image`` call made without ``output=``."""
    assert signed.data is not None
    return signed.data


def keys_json(server: RunningKms) -> list[dict[str, object]]:
    out = run_kms("keys", "list", "--config", str(server.config), "--json").stdout
    result: list[dict[str, object]] = json.loads(out)
    return result
