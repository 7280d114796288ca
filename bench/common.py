"""What the benchmarks share: the environment, client worker processes, statistics and the report.

Environment
-----------
``environment`` builds everything in a fresh temporary directory and removes it afterwards: ``kms init``
(development PKI, a SoftHSM2 token, SQLite), ``kms keys create`` for the benchmark keys, ``kms serve`` on a
free loopback port (all through ``tests.support.kms_server``, as real subprocesses), and the bare echo
server of ``bench.echo`` on the same configuration. For ``espsecure`` it finds the token's slot number and
writes one ``--hsm-config`` INI per key (mode 0600: it holds the PIN) naming the key by the label
``kms keys create`` gave it (``{key_id}/1``), so both paths sign with the same key in the same token.

Client workers
--------------
Python client threads share one GIL, so concurrent clients are separate processes (``WorkerPool``, started
with ``spawn``), each with its own channels: a ``KmsClient``, a raw channel to the KMS and a raw channel to
the echo server, all with the client certificate of the ``build-server`` role. A worker gets a command, runs
it and sends back a result. Timed commands carry a start time on the system-wide monotonic clock
(``time.monotonic`` is ``CLOCK_MONOTONIC`` on Linux, shared by all processes): workers warm up, sleep until
then and stop at the end time, so that all clients of one measurement run in the same window.

Besides the commands defined here, a benchmark module can define its own (``Task``: a picklable object
with a ``run_in(worker)`` method that runs in the worker process); ``Worker.channel`` and
``Worker.client_for`` give it cached channels and clients for any ``Endpoint`` (target and client
identity), ``Worker.state`` keeps what else it wants to reuse between commands.

Limits
------
Most targets are ratios (``Comparison``); the others are absolute (a time, a number of bytes) and are
``Limit``s. Both are reported in the same way: the medians, every sample, the target, whether it is met.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Literal, Protocol, TypeAlias

import google_crc32c
import grpc
import pkcs11

from bench.echo import ECHO_METHOD, STREAM_METHOD
from kms.hsm.config import HsmConfig
from kms.server.config import load_config
from kmsapi.v1 import common_pb2, signing_pb2
from kmsctl import (
    MAX_RECEIVE_MESSAGE_BYTES,
    MAX_SEND_MESSAGE_BYTES,
    UPLOAD_CHUNK_SIZE,
    KmsClient,
    RetryPolicy,
)
from tests.support.esp_images import build_app_image
from tests.support.kms_server import KeySpec, RunningKms, running_kms

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
IMAGE_SIZE = 1536 * 1024
"""1.5 MiB app images, as the issue asks."""
SIGN_DIGEST_METHOD = "/kmsapi.v1.SigningService/SignDigest"
CALL_TIMEOUT = 60.0


class BenchError(RuntimeError):
    """A benchmark could not run as designed (a tool failed, a signature did not verify, a worker died)."""


@dataclass(frozen=True)
class ImageKey:
    """A product with one Secure Boot V2 key, and the chip its images are built for."""

    name: str
    label: str
    key_id: str
    product: str
    algorithm: str
    chip: str

    def spec(self) -> KeySpec:
        return KeySpec(self.key_id, self.product, self.algorithm, 0)

    @property
    def hsm_label(self) -> str:
        """The CKA_LABEL ``kms keys create`` gives the key pair in the token."""
        return f"{self.key_id}/1"


IMAGE_KEYS: dict[str, ImageKey] = {
    "p256": ImageKey("p256", "ECDSA P-256", "bench-p256-0", "bench-p256", "ecdsa-p256", "esp32c6"),
    "rsa3072": ImageKey("rsa3072", "RSA-3072", "bench-rsa3072-0", "bench-rsa3072", "rsa3072-pss", "esp32s3"),
}
DIGEST_KEY = KeySpec("bench-digest-p256", "bench-digest", "ecdsa-p256", None, "digest-signing")
DIGEST_KEY_NAME = f"keys/{DIGEST_KEY.key_id}"


# -- statistics and the report ----------------------------------------------------------------------------


@dataclass
class Series:
    """Repeated measurements of one rate."""

    name: str
    unit: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "samples": self.samples,
            "min": min(self.samples, default=math.nan),
            "max": max(self.samples, default=math.nan),
        }


@dataclass(frozen=True)
class Comparison:
    """A subject rate against a baseline rate, measured interleaved in the same run.

    ``ratio`` is the ratio of the medians (what the issue asks for). ``paired_ratios`` divides the samples
    of the same repetition, which cancels slow drifts in machine load; their median is reported too.
    """

    name: str
    subject: Series
    baseline: Series
    target: float | None
    """The issue's target for the ratio; None for comparisons reported for information only."""
    note: str = ""
    lower_is_better: bool = False
    """The target is a maximum (latencies: the subject may be at most ``target`` times the baseline)."""

    @property
    def ratio(self) -> float:
        return self.subject.median / self.baseline.median if self.baseline.median else math.nan

    @property
    def paired_ratios(self) -> list[float]:
        pairs = zip(self.subject.samples, self.baseline.samples, strict=False)
        return [s / b for s, b in pairs if b]

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio <= self.target if self.lower_is_better else self.ratio >= self.target

    def to_json(self) -> dict[str, object]:
        paired = self.paired_ratios
        return {
            "name": self.name,
            "subject": self.subject.to_json(),
            "baseline": self.baseline.to_json(),
            "ratio_of_medians": self.ratio,
            "paired_ratios": paired,
            "median_paired_ratio": statistics.median(paired) if paired else math.nan,
            "target": self.target,
            "target_is_maximum": self.lower_is_better,
            "met": self.met,
            "note": self.note,
        }


@dataclass(frozen=True)
class Limit:
    """A measured quantity against an absolute target (a time, a size), not a ratio.

    ``value`` is the median of ``series``, or its worst sample with ``worst`` (the largest when the target
    is a maximum): for memory, the worst case is what a deployment must provision for.
    """

    name: str
    series: Series
    target: float | None
    at_most: bool = True
    worst: bool = False
    note: str = ""

    @property
    def value(self) -> float:
        if not self.series.samples:
            return math.nan
        if not self.worst:
            return self.series.median
        return max(self.series.samples) if self.at_most else min(self.series.samples)

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "series": self.series.to_json(),
            "value": self.value,
            "statistic": ("max" if self.at_most else "min") if self.worst else "median",
            "target": self.target,
            "target_is_maximum": self.at_most,
            "met": self.met,
            "note": self.note,
        }


def _rate(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def format_table(comparisons: Sequence[Comparison]) -> str:
    """The comparisons as a fixed-width table: medians, ratios, targets."""
    header = ("comparison", "subject median", "baseline median", "ratio", "paired", "target", "met")
    rows: list[tuple[str, ...]] = [header]
    for c in comparisons:
        paired = c.paired_ratios
        rows.append(
            (
                c.name,
                f"{_rate(c.subject.median)} {c.subject.unit}",
                f"{_rate(c.baseline.median)} {c.baseline.unit}",
                f"{c.ratio:.2f}x",
                f"{statistics.median(paired):.2f}x" if paired else "-",
                "-" if c.target is None else f"{'<=' if c.lower_is_better else '>='} {c.target:g}x",
                {True: "yes", False: "NO", None: "info"}[c.met],
            )
        )
    return _columns(rows)


def _columns(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_limits(limits: Sequence[Limit]) -> str:
    """The absolute targets as a fixed-width table: value, target, met."""
    rows: list[tuple[str, ...]] = [("measurement", "value", "statistic", "target", "met")]
    for limit in limits:
        unit = limit.series.unit
        rows.append(
            (
                limit.name,
                f"{_rate(limit.value)} {unit}",
                ("max" if limit.at_most else "min") if limit.worst else "median",
                "-" if limit.target is None else f"{'<=' if limit.at_most else '>='} {limit.target:g} {unit}",
                {True: "yes", False: "NO", None: "info"}[limit.met],
            )
        )
    return _columns(rows)


def format_series(comparisons: Sequence[Comparison], limits: Sequence[Limit] = ()) -> str:
    """Every sample, one line per series, for the reader who wants to see the spread."""
    lines = []
    shown: set[int] = set()
    every = [s for c in comparisons for s in (c.subject, c.baseline)] + [limit.series for limit in limits]
    for s in every:
        if id(s) in shown:
            continue
        shown.add(id(s))
        samples = ", ".join(_rate(v) for v in s.samples)
        lines.append(f"  {s.name}: median {_rate(s.median)} {s.unit} from [{samples}]")
    return "\n".join(lines)


def machine_info() -> dict[str, object]:
    """What the numbers depend on: CPU, kernel, versions, load."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    softhsm = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        softhsm = subprocess.run(
            ["softhsm2-util", "--version"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(BENCH_DIR.parent)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=False)
        commit = head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "esptool": importlib.metadata.version("esptool"),
        "python-pkcs11": importlib.metadata.version("python-pkcs11"),
        "softhsm2": softhsm,
        "load_average": os.getloadavg(),
    }


def write_results(document: dict[str, object], path: Path | None = None) -> Path:
    target = path or RESULTS_DIR / "latest.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target


def log(message: str) -> None:
    """Progress, on stderr (stdout carries the report)."""
    print(message, file=sys.stderr, flush=True)


def sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- the environment ----------------------------------------------------------------------------------------


@dataclass
class Environment:
    root: Path
    kms: RunningKms
    echo_port: int
    softhsm2_conf: Path
    pkcs11_module: Path
    slot_id: int
    public_keys: dict[str, Path]
    """PEM files of the image keys, by ``ImageKey.name``."""

    @property
    def echo_target(self) -> str:
        return f"localhost:{self.echo_port}"

    def hsm_config(self, key: ImageKey) -> Path:
        """An espsecure ``--hsm-config`` INI for ``key`` (0600; it holds the PIN)."""
        path = self.root / f"hsm-{key.name}.ini"
        if not path.exists():
            pin = (self.kms.state_dir / "hsm-pin").read_text(encoding="ascii").strip()
            text = (
                "[hsm_config]\n"
                f"pkcs11_lib = {self.pkcs11_module}\n"
                f"credentials = {pin}\n"
                f"slot = {self.slot_id}\n"
                f"label = {key.hsm_label}\n"
                f"label_pubkey = {key.hsm_label}\n"
            )
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".hsm-", suffix=".ini")  # created 0600
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(text)
            Path(tmp).replace(path)
        return path

    def tool_env(self) -> dict[str, str]:
        """The environment for processes that open the token themselves (espsecure)."""
        return dict(os.environ, SOFTHSM2_CONF=str(self.softhsm2_conf))

    def endpoint(self, role: str, target: str | None = None) -> Endpoint:
        """The KMS (or ``target``) as a client with ``role``'s certificate reaches it."""
        creds = self.kms.credentials(role)
        return Endpoint(target or self.kms.target, creds["ca"], creds["cert"], creds["key"])

    def worker_setup(self) -> WorkerSetup:
        creds = self.kms.credentials("build-server")
        return WorkerSetup(
            kms_target=self.kms.target,
            echo_target=self.echo_target,
            ca=creds["ca"],
            cert=creds["cert"],
            key=creds["key"],
        )


def _token_slot(module: Path, token_label: str, softhsm2_conf: Path) -> int:
    """The PKCS#11 slot id of the token (espsecure selects tokens by slot id)."""
    os.environ["SOFTHSM2_CONF"] = str(softhsm2_conf)
    lib = pkcs11.lib(str(module))
    try:
        slot_id: int = lib.get_token(token_label=token_label).slot.slot_id
    finally:
        with contextlib.suppress(Exception):
            lib.finalize()
    return slot_id


def digest_request(digest: bytes) -> bytes:
    """A serialized ``SignDigestRequest`` as ``KmsClient.sign_digest`` sends it (raw encoding, CRC32C)."""
    return signing_pb2.SignDigestRequest(
        name=DIGEST_KEY_NAME,
        digest=common_pb2.Digest(sha256=digest),
        encoding=common_pb2.RAW,
        digest_crc32c=int(google_crc32c.value(digest)),
    ).SerializeToString()


def distinct_digests(worker: int, count: int) -> list[bytes]:
    """``count`` different 32-byte digests, different for every worker."""
    return [worker.to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(24) for n in range(count)]


@contextlib.contextmanager
def _echo_server(config: Path, response_file: Path, log_path: Path) -> Iterator[int]:
    with server_process("bench.echo", config, ["--response-file", str(response_file)], log_path) as (port, _):
        yield port


@contextlib.contextmanager
def server_process(
    module: str, config: Path, args: Sequence[str], log_path: Path, *, subcommand: str | None = None
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Run ``python -m module [SUBCOMMAND] --config CONFIG --ready-file FILE ARGS`` until the block ends;
    yields the port it wrote to the ready file, and the process. Stopped with SIGTERM."""
    ready = config.parent / f"{module}-ready-{time.monotonic_ns()}"
    command = [sys.executable, "-m", module, *([subcommand] if subcommand else [])]
    command += ["--config", str(config), "--ready-file", str(ready), *args]
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if process.poll() is not None:
                raise BenchError(f"{module} exited {process.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{module} did not become ready in 60 s")
            time.sleep(0.05)
        yield int(ready.read_text()), process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def environment(
    image_keys: Sequence[ImageKey], *, keep: bool = False, product_sets: Sequence[str] = ()
) -> Iterator[Environment]:
    """A running KMS with ``image_keys`` and the digest key, and a running echo server (see the module doc).

    ``product_sets`` are products that get the factory and distribution keys too (``kms keys
    create-product-set``: KEK, OTA manifest key, registration transport key, payload-seed key).
    The temporary directory is removed afterwards unless ``keep``.
    """
    root = Path(tempfile.mkdtemp(prefix="kms-bench-"))
    try:
        keys = [key.spec() for key in image_keys] + [DIGEST_KEY]
        sets = f", product sets {', '.join(product_sets)}" if product_sets else ""
        log(f"setting up {root}: kms init, {len(keys)} keys{sets}, kms serve, echo server")
        with running_kms(root / "state", keys, product_sets=product_sets) as kms:
            config = load_config(kms.config)
            hsm = HsmConfig.from_uri(config.hsm_uri)
            if config.softhsm2_conf is None or hsm.token_label is None:
                raise BenchError("the benchmark needs the SoftHSM2 token that `kms init` creates")
            slot_id = _token_slot(hsm.module_path, hsm.token_label, config.softhsm2_conf)
            public_keys: dict[str, Path] = {}
            with kms.client() as client:
                for key in image_keys:
                    pem = root / f"{key.name}.pem"
                    pem.write_text(client.get_public_key(f"keys/{key.key_id}").pem, encoding="ascii")
                    public_keys[key.name] = pem
            response_file = root / "sign-digest-response.bin"
            response_file.write_bytes(_one_sign_digest(kms))
            with _echo_server(kms.config, response_file, root / "echo.log") as echo_port:
                yield Environment(
                    root=root,
                    kms=kms,
                    echo_port=echo_port,
                    softhsm2_conf=config.softhsm2_conf,
                    pkcs11_module=hsm.module_path,
                    slot_id=slot_id,
                    public_keys=public_keys,
                )
    finally:
        if keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _one_sign_digest(kms: RunningKms) -> bytes:
    """The bytes of one real ``SignDigestResponse``: the echo server answers with them."""
    creds = kms.credentials()
    with _channel(kms.target, creds["ca"], creds["cert"], creds["key"]) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(SIGN_DIGEST_METHOD)
        response: bytes = call(digest_request(bytes(32)), timeout=CALL_TIMEOUT)
    return response


@dataclass(frozen=True)
class Endpoint:
    """A server and the client identity (certificate of a role) a worker reaches it with."""

    target: str
    ca: Path
    cert: Path
    key: Path


def _channel(target: str, ca: Path, cert: Path, key: Path, *, own_connection: bool = False) -> grpc.Channel:
    """A channel like ``KmsClient``'s: mutual TLS with the given identity, the client's message limits.

    With ``own_connection`` the channel does not share gRPC's process-wide subchannel pool, so it opens a
    connection of its own even when another channel has the same target and arguments.
    """
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )
    options: list[tuple[str, str | int]] = [
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ("grpc.primary_user_agent", "kms-bench"),
    ]
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return grpc.secure_channel(target, credentials, options)


def open_channel(endpoint: Endpoint, *, own_connection: bool = False) -> grpc.Channel:
    """A new channel to ``endpoint`` (the caller closes it); see ``_channel``."""
    return _channel(endpoint.target, endpoint.ca, endpoint.cert, endpoint.key, own_connection=own_connection)


# -- client worker processes --------------------------------------------------------------------------------

CallKind: TypeAlias = Literal["sign-digest", "echo", "kmsctl"]
"""``sign-digest``: raw SignDigest calls, the serialized request in and the response bytes out (the same
client work as ``echo``); ``echo``: the same request bytes to the echo server; ``kmsctl``: ``KmsClient``
with its client-side checks (CRC32C of digest and signature), for information."""


@dataclass(frozen=True)
class WorkerSetup:
    kms_target: str
    echo_target: str
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class PrepareImages:
    """Build app images in the worker's memory (outside any timed window)."""

    chip: str
    size: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class SignImages:
    """At ``start_at``, sign every prepared image in turn with ``KmsClient.sign_image``; drop them.

    With ``via="echo"`` the images go through the echo server's stream instead, up and back down in
    chunks of the client's upload size: the transport alone.
    """

    product: str
    start_at: float
    via: Literal["kms", "echo"] = "kms"


@dataclass(frozen=True)
class CallLoop:
    """Warm up, then make calls of ``kind`` back to back from ``start_at`` until ``end_at``."""

    kind: CallKind
    start_at: float
    end_at: float


class Task(Protocol):
    """A command a benchmark module defines: ``run_in`` runs in the worker process (see the module doc)."""

    def run_in(self, worker: Worker) -> Done: ...


Command: TypeAlias = PrepareImages | SignImages | CallLoop | Task


@dataclass(frozen=True)
class Done:
    """What a worker answers: ``count`` images or calls completed in [``began``, ``ended``].

    ``samples`` carries what else a ``Task`` measured (latencies, per-stream times), by name.
    """

    count: int
    began: float
    ended: float
    late: bool = False
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Failure:
    text: str


class Worker:
    """The state of one worker process; runs commands sent by ``WorkerPool``."""

    def __init__(self, index: int, setup: WorkerSetup) -> None:
        self.index = index
        self.state: dict[str, object] = {}
        """What ``Task``s keep between commands in this process."""
        self._channels: dict[Endpoint, grpc.Channel] = {}
        self._clients: dict[tuple[Endpoint, float], KmsClient] = {}
        self.client = KmsClient.from_files(
            setup.kms_target,
            ca=setup.ca,
            cert=setup.cert,
            key=setup.key,
            timeout=CALL_TIMEOUT,
            retries=RetryPolicy(max_attempts=1),
        )
        self.kms_channel = _channel(setup.kms_target, setup.ca, setup.cert, setup.key)
        self.echo_channel = _channel(setup.echo_target, setup.ca, setup.cert, setup.key)
        self.images: list[bytes] = []
        self.digests = distinct_digests(index, 512)
        self.requests = [digest_request(d) for d in self.digests]

    def run(self, command: Command) -> Done:
        if isinstance(command, PrepareImages):
            return self._prepare(command)
        if isinstance(command, SignImages):
            return self._sign_images(command)
        if isinstance(command, CallLoop):
            return self._call_loop(command)
        return command.run_in(self)

    def channel(self, endpoint: Endpoint) -> grpc.Channel:
        """A channel to ``endpoint`` like ``KmsClient``'s, made once per worker and endpoint."""
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = _channel(endpoint.target, endpoint.ca, endpoint.cert, endpoint.key)
            self._channels[endpoint] = channel
        return channel

    def client_for(self, endpoint: Endpoint, timeout: float = CALL_TIMEOUT) -> KmsClient:
        """A ``KmsClient`` for ``endpoint`` (no retries), made once per worker, endpoint and timeout."""
        client = self._clients.get((endpoint, timeout))
        if client is None:
            client = KmsClient.from_files(
                endpoint.target,
                ca=endpoint.ca,
                cert=endpoint.cert,
                key=endpoint.key,
                timeout=timeout,
                retries=RetryPolicy(max_attempts=1),
            )
            self._clients[(endpoint, timeout)] = client
        return client

    def _prepare(self, command: PrepareImages) -> Done:
        began = time.monotonic()
        self.images = [build_app_image(command.chip, command.size, seed=seed) for seed in command.seeds]
        self.client.list_keys()  # the connection is up before any timed window
        return Done(len(self.images), began, time.monotonic())

    def _sign_images(self, command: SignImages) -> Done:
        images, self.images = self.images, []
        late = time.monotonic() > command.start_at
        sleep_until(command.start_at)
        began = time.monotonic()
        for image in images:
            if command.via == "echo":
                self._stream_echo(image)
                continue
            signed = self.client.sign_image(command.product, image)
            if signed.release.reused:
                raise BenchError("the service returned a stored release: the images must all differ")
        return Done(len(images), began, time.monotonic(), late)

    def _stream_echo(self, image: bytes) -> None:
        stub: grpc.StreamStreamMultiCallable[bytes, bytes] = self.echo_channel.stream_stream(STREAM_METHOD)
        chunks = (image[i : i + UPLOAD_CHUNK_SIZE] for i in range(0, len(image), UPLOAD_CHUNK_SIZE))
        received = sum(len(chunk) for chunk in stub(chunks, timeout=CALL_TIMEOUT))
        if received != len(image):
            raise BenchError(f"the echo stream returned {received} of {len(image)} bytes")

    def _call(self, kind: CallKind) -> Callable[[int], object]:
        if kind == "kmsctl":
            digests = self.digests

            def sign(n: int) -> object:
                return self.client.sign_digest(DIGEST_KEY_NAME, digests[n % len(digests)])

            return sign
        channel, method = (
            (self.kms_channel, SIGN_DIGEST_METHOD)
            if kind == "sign-digest"
            else (self.echo_channel, ECHO_METHOD)
        )
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        requests = self.requests

        def call(n: int) -> object:
            return stub(requests[n % len(requests)], timeout=CALL_TIMEOUT)

        return call

    def _call_loop(self, command: CallLoop) -> Done:
        call = self._call(command.kind)
        for n in range(5):
            call(n)
        late = time.monotonic() > command.start_at
        sleep_until(command.start_at)
        began = time.monotonic()
        count = 0
        while True:
            call(count)
            if time.monotonic() > command.end_at:
                break
            count += 1
        return Done(count, max(began, command.start_at), command.end_at, late)

    def close(self) -> None:
        self.client.close()
        self.kms_channel.close()
        self.echo_channel.close()
        for client in self._clients.values():
            client.close()
        for channel in self._channels.values():
            channel.close()
        for value in self.state.values():
            close = getattr(value, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()


def _worker_main(index: int, setup: WorkerSetup, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the workers
    worker: Worker | None = None
    try:
        worker = Worker(index, setup)
        conn.send("ready")
        while (command := conn.recv()) is not None:
            try:
                conn.send(worker.run(command))
            except Exception:  # noqa: BLE001 - reported to the parent, which stops the run
                conn.send(_Failure(traceback.format_exc()))
    except Exception:  # noqa: BLE001
        conn.send(_Failure(traceback.format_exc()))
    finally:
        if worker is not None:
            worker.close()
        conn.close()


class WorkerPool:
    """``size`` client processes (``spawn``), each with its own channels; see the module documentation."""

    def __init__(self, setup: WorkerSetup, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[SpawnProcess, Connection]] = []
        try:
            for index in range(size):
                parent, child = context.Pipe()
                process = context.Process(
                    target=_worker_main, args=(index, setup, child), name=f"bench-client-{index}", daemon=True
                )
                process.start()
                child.close()
                self._workers.append((process, parent))
            for _process, conn in self._workers:
                self._receive(conn, timeout=120)
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self._workers)

    def run(self, commands: Sequence[Command], timeout: float = 600) -> list[Done]:
        """Send ``commands[i]`` to worker ``i`` and wait for all answers."""
        if len(commands) > len(self._workers):
            raise ValueError(f"{len(commands)} commands for {len(self._workers)} workers")
        for (_process, conn), command in zip(self._workers, commands, strict=False):
            conn.send(command)
        results = []
        for _process, conn in self._workers[: len(commands)]:
            answer = self._receive(conn, timeout)
            if not isinstance(answer, Done):
                raise BenchError(f"a client worker answered {answer!r}")
            results.append(answer)
        return results

    @staticmethod
    def _receive(conn: Connection, timeout: float) -> object:
        if not conn.poll(timeout):
            raise BenchError(f"a client worker did not answer in {timeout:.0f} s")
        try:
            answer: object = conn.recv()
        except EOFError:
            raise BenchError("a client worker died") from None
        if isinstance(answer, _Failure):
            raise BenchError(f"a client worker failed:\n{answer.text}")
        return answer

    def close(self) -> None:
        for _process, conn in self._workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process, conn in self._workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
            conn.close()
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
