"""Per-device payloads: streaming throughput, payload key derivations, server memory under 32 streams.

Throughput (``throughput_benchmark``)
    One client process downloads whole FKSP_V1 payloads (default 4 KiB segments) of a 16 MiB signed image,
    one after the other, each for another registered device. Subject: ``GetPayload`` on the KMS; baseline:
    the bare stream server of this module (``python -m bench.payloads``), built like ``bench.echo``'s
    server from the same ``kms.toml`` (same mutual TLS, channel options, thread pool and
    ``maximum_concurrent_rpcs``), which answers with the same messages on the wire: a real ``PayloadInfo``
    message captured from the KMS, then ``GetPayloadResponse`` chunk messages of 64 KiB (the last shorter)
    carrying as many bytes as the real payload. Both clients send the same serialized request through the
    same raw-bytes channel code and count the bytes they receive, so client work is identical and the
    difference is the service's: reading the image, AES-GCM per segment, protobuf messages. A third series
    downloads through ``KmsClient.get_payload`` (with its client-side checks) for information. Every
    repetition runs the three in turn, the order rotating from one repetition to the next.

Derivations (``derivation_benchmark``)
    Payload keys per second. Subject: ``kms.hsm.Pkcs11Hsm.hmac_with_wrapped_secret`` (what
    ``Distribution`` calls), in a client process of its own with the same token, on the real KEK blobs of
    the registered devices. Baseline: a bare python-pkcs11 loop in another process doing the same
    PKCS#11 calls with the KEK handle found once: ``C_UnwrapKey`` (``CKM_AES_KEY_WRAP``) into a session
    object with the service's template, ``C_Sign`` (``CKM_SHA256_HMAC``), ``C_DestroyObject``. Both compute
    the same key for the same blob and message (checked first). For information, derivations per second
    through the whole ``GetPayload`` RPC with ``offset = total_size - 1`` (the stream carries the payload
    info and one byte) from several client processes. Windows interleaved and rotated.

Memory (``memory_benchmark``)
    The ``kms serve`` process's memory at rest after the downloads above, then while 32 payloads of the 16
    MiB image (32 devices) are downloaded at once by client processes (several streams per process, one
    connection per stream) that read slowly enough that the downloads overlap. ``/proc/PID/status``
    (VmRSS, RssAnon, RssFile) and ``/proc/PID/smaps_rollup`` (PSS, USS = private clean + private dirty)
    are sampled every 0.1 s. The image is memory-mapped: its page-cache pages count in RSS (RssFile) once
    touched and are shared with the page cache, which is why anonymous memory, PSS and USS are reported
    too. Each stream reports when it started, got its first byte and ended, so the report says how many
    were really in flight at once. The same is measured on the bare stream server, for information.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import signal
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import grpc

from bench.common import (
    BenchError,
    Comparison,
    Done,
    Endpoint,
    Environment,
    ImageKey,
    Limit,
    Series,
    Worker,
    WorkerPool,
    log,
    open_channel,
    server_process,
    sleep_until,
)
from kms.server.app import _server_options
from kms.server.config import load_config
from kmsapi.v1 import devices_pb2
from kmsctl import DeviceRegistration
from tests.support.esp_images import build_app_image

PRODUCT = "bench-fleet"
PAYLOAD_KEY = ImageKey("fleet", "ECDSA P-256", "bench-fleet-sb0", PRODUCT, "ecdsa-p256", "esp32c6")
"""The product's Secure Boot V2 key: signs the image whose payloads are measured."""
IMAGE_SIZE = 16 * 1024 * 1024 - 4096
"""The unsigned app image; signed (a 4 KiB signature sector appended) it is exactly 16 MiB."""
MESSAGE_SIZE = 64 * 1024
"""Payload bytes per ``GetPayloadResponse`` chunk (the server's ``PAYLOAD_CHUNK``)."""
GET_PAYLOAD_METHOD = "/kmsapi.v1.DistributionService/GetPayload"
STREAM_METHOD = "/bench.PayloadStream/Stream"
_SERVICE = "bench.PayloadStream"
CONCURRENT_STREAMS = 32
THROUGHPUT_TARGET = 0.8
DERIVATION_TARGET = 0.8
MEMORY_TARGET_MIB = 64.0
DEVICES = 40
"""Registered devices: every download and derivation cycles through them."""
MIB = 1024 * 1024
_START_LEAD = 1.0
_STREAMS_LEAD = 3.0
"""Seconds for the slow readers to connect (32 TLS connections) before their streams start."""
WIDE_WORKERS = 48
"""Server threads of the second KMS process of the memory benchmark: enough for 32 streams at once."""
_CALL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Plan:
    repetitions: int
    downloads: int
    """Whole payloads per series per repetition (one client, one after the other)."""
    derivation_seconds: float
    """Length of one timed window of derivations."""
    rpc_clients: int
    """Client processes for the GetPayload derivation series (information)."""
    memory_rounds: int
    """Rounds of 32 concurrent downloads from the KMS (the bare server gets one)."""
    stream_seconds: float
    """How long one slow reader takes to read a whole payload."""
    streams_per_process: int

    @property
    def processes(self) -> int:
        return max(-(-CONCURRENT_STREAMS // self.streams_per_process), self.rpc_clients, 2)


FULL = Plan(
    repetitions=5,
    downloads=4,
    derivation_seconds=3.0,
    rpc_clients=4,
    memory_rounds=2,
    stream_seconds=12.0,
    streams_per_process=4,
)
QUICK = Plan(
    repetitions=2,
    downloads=2,
    derivation_seconds=1.0,
    rpc_clients=4,
    memory_rounds=1,
    stream_seconds=4.0,
    streams_per_process=4,
)


# -- the bare stream server ---------------------------------------------------------------------------------


def build_stream_server(config_path: Path, info: bytes, payload_size: int) -> tuple[grpc.Server, int]:
    """The bare stream server, bound to a free loopback port, not started (built like ``bench.echo``).

    Every call gets ``info``, then ``payload_size`` bytes as serialized ``GetPayloadResponse`` chunk
    messages of 64 KiB (the last shorter), built once: random bytes, the same for every full chunk (their
    content costs nothing here: gRPC does not compress, TLS encrypts whatever it gets).
    """
    config = load_config(config_path)
    limits = config.limits
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="rpc"),
        options=_server_options(config),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )
    full = devices_pb2.GetPayloadResponse(chunk=os.urandom(MESSAGE_SIZE)).SerializeToString()
    count, rest = divmod(payload_size, MESSAGE_SIZE)
    last = devices_pb2.GetPayloadResponse(chunk=os.urandom(rest)).SerializeToString() if rest else b""

    def stream(_request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        yield info
        for _ in range(count):
            yield full
        if last:
            yield last

    handler = grpc.method_handlers_generic_handler(
        _SERVICE, {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=config.tls_client_ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    if port == 0:
        raise OSError("cannot listen on a loopback port")
    return server, port


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.payloads --config KMS.TOML --ready-file FILE --info-file FILE --payload-size N``:
    the bare stream server. Every call (whatever the request) gets the serialized ``GetPayloadResponse``
    in ``--info-file``, then N bytes in 64 KiB chunk messages. Runs until SIGTERM or SIGINT; writes the
    bound port to the ready file once serving."""
    parser = argparse.ArgumentParser(prog="python -m bench.payloads", description="the bare stream server")
    parser.add_argument("--config", type=Path, required=True, help="the KMS configuration (kms.toml)")
    parser.add_argument("--ready-file", type=Path, required=True, help="the bound port is written here")
    parser.add_argument("--info-file", type=Path, required=True, help="the first message of every stream")
    parser.add_argument("--payload-size", type=int, required=True, help="payload bytes after it")
    args = parser.parse_args(argv)
    server, port = build_stream_server(args.config, args.info_file.read_bytes(), args.payload_size)
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(f"{port}\n", encoding="ascii")
    tmp.replace(args.ready_file)
    stopping.wait()
    server.stop(5).wait()
    return 0


# -- worker tasks -------------------------------------------------------------------------------------------


def payload_request(device_id: str, release: str, offset: int = 0) -> bytes:
    """A serialized ``GetPayloadRequest`` for the FKSP_V1 payload with the default segment size."""
    return devices_pb2.GetPayloadRequest(
        device_id=device_id, release=release, format=devices_pb2.FKSP_V1, offset=offset
    ).SerializeToString()


def _receive(channel: grpc.Channel, method: str, request: bytes) -> int:
    """Make one raw streaming call and read it to the end; the bytes of every message received."""
    stub: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method)
    return sum(len(message) for message in stub(request, timeout=_CALL_TIMEOUT))


@dataclass(frozen=True)
class FetchPayloads:
    """At ``start_at``, download ``count`` whole payloads one after the other, cycling through ``devices``.

    ``via="raw"``: raw-bytes calls of ``method`` (the KMS's GetPayload or the bare stream), ``count`` is the
    bytes received; ``via="kmsctl"``: ``KmsClient.get_payload`` into memory, ``count`` is payload bytes.
    """

    endpoint: Endpoint
    method: str
    devices: tuple[str, ...]
    release: str
    payload_size: int
    count: int
    start_at: float
    via: Literal["raw", "kmsctl"] = "raw"

    def run_in(self, worker: Worker) -> Done:
        channel = worker.channel(self.endpoint)
        client = worker.client_for(self.endpoint, _CALL_TIMEOUT)
        requests = [payload_request(device, self.release) for device in self.devices]
        # The connection is up before the window: a payload's last byte.
        if self.via == "raw":
            _receive(
                channel, self.method, payload_request(self.devices[-1], self.release, self.payload_size - 1)
            )
        else:
            client.get_payload(self.devices[-1], self.release, offset=self.payload_size - 1)
        late = time.monotonic() > self.start_at
        sleep_until(self.start_at)
        began = time.monotonic()
        received = 0
        for n in range(self.count):
            if self.via == "raw":
                received += _receive(channel, self.method, requests[n % len(requests)])
            else:
                download = client.get_payload(self.devices[n % len(self.devices)], self.release)
                received += len(download.data or b"")
        return Done(received, began, time.monotonic(), late)


@dataclass(frozen=True)
class TinyPayloads:
    """Warm up, then call GetPayload with ``offset = total_size - 1`` back to back from ``start_at`` until
    ``end_at``: each call derives a payload key and streams the payload info and one byte."""

    endpoint: Endpoint
    requests: tuple[bytes, ...]
    start_at: float
    end_at: float

    def run_in(self, worker: Worker) -> Done:
        channel = worker.channel(self.endpoint)
        for n in range(3):
            _receive(channel, GET_PAYLOAD_METHOD, self.requests[n % len(self.requests)])
        late = time.monotonic() > self.start_at
        sleep_until(self.start_at)
        began = time.monotonic()
        count = 0
        while True:
            _receive(channel, GET_PAYLOAD_METHOD, self.requests[count % len(self.requests)])
            if time.monotonic() > self.end_at:
                break
            count += 1
        return Done(count, max(began, self.start_at), self.end_at, late)


@dataclass(frozen=True)
class HsmSetup:
    """How a worker reaches the KMS's token itself: the configuration's PKCS#11 URI and SoftHSM2 file."""

    hsm_uri: str
    softhsm2_conf: str


class _RawPkcs11:
    """The baseline: python-pkcs11 directly, one session, the KEK handle found once."""

    def __init__(self, setup: HsmSetup, kek_hsm_id: bytes) -> None:
        import pkcs11

        from kms.hsm.config import HsmConfig

        os.environ["SOFTHSM2_CONF"] = setup.softhsm2_conf
        config = HsmConfig.from_uri(setup.hsm_uri)
        self._pkcs11 = pkcs11
        self._lib = pkcs11.lib(str(config.module_path))
        token = self._lib.get_token(token_label=config.token_label)
        self._session = token.open(rw=True, user_pin=config.read_pin())
        # An AES key with unwrap capability (the stubs type get_key as a plain Key).
        self._kek: Any = self._session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, id=kek_hsm_id)
        attribute = pkcs11.Attribute
        # The template kms.hsm.secret_keys gives a payload-key session object.
        self._template = {
            attribute.TOKEN: False,
            attribute.PRIVATE: True,
            attribute.SENSITIVE: True,
            attribute.EXTRACTABLE: False,
            attribute.SIGN: True,
        }

    def hmac(self, wrapped: bytes, message: bytes) -> bytes:
        p11 = self._pkcs11
        obj = self._kek.unwrap_key(
            p11.ObjectClass.SECRET_KEY,
            p11.KeyType.GENERIC_SECRET,
            wrapped,
            mechanism=p11.Mechanism.AES_KEY_WRAP,
            store=False,
            capabilities=p11.MechanismFlag.SIGN,
            template=self._template,
        )
        try:
            return bytes(obj.sign(message, mechanism=p11.Mechanism.SHA256_HMAC))
        finally:
            obj.destroy()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._session.close()
        with contextlib.suppress(Exception):
            self._lib.finalize()


class _ServicePath:
    """The subject: ``Pkcs11Hsm``, opened as ``kms serve`` opens it."""

    def __init__(self, setup: HsmSetup, kek_hsm_id: bytes) -> None:
        from kms.hsm.config import HsmConfig
        from kms.hsm.pkcs11_hsm import Pkcs11Hsm

        os.environ["SOFTHSM2_CONF"] = setup.softhsm2_conf
        self._hsm = Pkcs11Hsm(HsmConfig.from_uri(setup.hsm_uri))
        self._hsm.open()
        self._kek_hsm_id = kek_hsm_id

    def hmac(self, wrapped: bytes, message: bytes) -> bytes:
        return self._hsm.hmac_with_wrapped_secret(self._kek_hsm_id, wrapped, message)

    def close(self) -> None:
        self._hsm.close()


@dataclass(frozen=True)
class Derivations:
    """Derive payload keys back to back from ``start_at`` until ``end_at`` (``path``: ``service`` or
    ``raw``), cycling through the (blob, message) pairs; ``start_at`` 0 computes the first pair once and
    returns it (``samples["key"]``, as bytes values) to check that both paths agree."""

    path: Literal["service", "raw"]
    setup: HsmSetup
    kek_hsm_id: bytes
    blobs: tuple[bytes, ...]
    messages: tuple[bytes, ...]
    start_at: float
    end_at: float

    def run_in(self, worker: Worker) -> Done:
        name = f"hsm-{self.path}"
        hsm = worker.state.get(name)
        if not isinstance(hsm, _RawPkcs11 | _ServicePath):
            hsm = (_ServicePath if self.path == "service" else _RawPkcs11)(self.setup, self.kek_hsm_id)
            worker.state[name] = hsm
        pairs = list(zip(self.blobs, self.messages, strict=True))
        if self.start_at == 0:
            key = hsm.hmac(*pairs[0])
            now = time.monotonic()
            return Done(1, now, now, samples={"key": [float(b) for b in key]})
        for pair in pairs[:5]:
            hsm.hmac(*pair)
        late = time.monotonic() > self.start_at
        sleep_until(self.start_at)
        count = 0
        while True:
            hsm.hmac(*pairs[count % len(pairs)])
            if time.monotonic() > self.end_at:
                break
            count += 1
        return Done(count, self.start_at, self.end_at, late)


@dataclass(frozen=True)
class SlowStreams:
    """At ``start_at``, one thread per request opens its own connection and downloads the whole stream,
    reading at most ``wire_bytes / seconds`` bytes per second. ``samples`` holds each stream's start,
    first message and end (monotonic seconds)."""

    endpoint: Endpoint
    method: str
    requests: tuple[bytes, ...]
    wire_bytes: int
    seconds: float
    start_at: float

    def run_in(self, worker: Worker) -> Done:
        times: list[tuple[float, float, float, int]] = [(0.0, 0.0, 0.0, 0)] * len(self.requests)
        errors: list[BaseException] = []
        rate = self.wire_bytes / self.seconds

        def read(index: int, request: bytes) -> None:
            try:
                with open_channel(self.endpoint, own_connection=True) as channel:
                    grpc.channel_ready_future(channel).result(timeout=30)
                    stub: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(self.method)
                    sleep_until(self.start_at)
                    began = time.monotonic()
                    first = 0.0
                    received = 0
                    for message in stub(request, timeout=_CALL_TIMEOUT * 5):
                        received += len(message)
                        now = time.monotonic()
                        if not first:
                            first = now  # paced from here: a stream that waited for a thread is not late
                        delay = first + received / rate - now
                        if delay > 0:
                            time.sleep(delay)
                    times[index] = (began, first, time.monotonic(), received)
            except BaseException as error:  # noqa: BLE001 - re-raised on the worker's thread
                errors.append(error)

        threads = [
            threading.Thread(target=read, args=(i, request), name=f"slow-stream-{i}", daemon=True)
            for i, request in enumerate(self.requests)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return Done(
            sum(t[3] for t in times),
            min(t[0] for t in times),
            max(t[2] for t in times),
            samples={
                "began": [t[0] for t in times],
                "first": [t[1] for t in times],
                "ended": [t[2] for t in times],
                "bytes": [float(t[3]) for t in times],
            },
        )


# -- set-up -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    """What the payload benchmarks share: the release, the devices, the payload's size on the wire."""

    release: str
    devices: tuple[str, ...]
    info: bytes
    """The first message of a real GetPayload stream (serialized ``GetPayloadResponse`` with the info)."""
    payload_size: int
    """Payload bytes (``PayloadInfo.total_size``)."""
    wire_bytes: int
    """Bytes of every message of a whole download as the raw client counts them."""


def device_ids(count: int) -> tuple[str, ...]:
    return tuple(f"bench-payload-{n:04d}" for n in range(count))


def prepare(env: Environment) -> Fixture:
    """Sign the 16 MiB image, register the devices (wrapped transport), warm every device's payload (its
    manifest signature is made on the first request and stored) and capture a real payload info."""
    log(f"payloads: signing a {(IMAGE_SIZE + 4096) // MIB} MiB image, registering {DEVICES} devices")
    image = build_app_image(PAYLOAD_KEY.chip, IMAGE_SIZE, seed=0x5EED)
    with env.kms.client(timeout=_CALL_TIMEOUT) as client:
        signed = client.sign_image(PRODUCT, image)
    del image
    devices = device_ids(DEVICES)
    with env.kms.client("factory-registrar", timeout=_CALL_TIMEOUT) as client:
        summary = client.register_devices(
            PRODUCT, (DeviceRegistration(device, PAYLOAD_KEY.chip, os.urandom(32)) for device in devices)
        )
    if summary.created != DEVICES:
        raise BenchError(f"registered {summary.created} of {DEVICES} devices: {summary.rejected[:3]}")
    release = signed.release.name
    with open_channel(env.endpoint("distribution-server")) as channel:
        stub: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(GET_PAYLOAD_METHOD)
        messages = list(stub(payload_request(devices[0], release), timeout=_CALL_TIMEOUT))
        info = devices_pb2.GetPayloadResponse.FromString(messages[0]).info
        payload = sum(len(devices_pb2.GetPayloadResponse.FromString(m).chunk) for m in messages[1:])
        if payload != info.total_size or len(messages[1]) - MESSAGE_SIZE > 8:
            raise BenchError("the KMS streamed another payload than it announced")
        for device in devices[1:]:
            _receive(channel, GET_PAYLOAD_METHOD, payload_request(device, release, info.total_size - 1))
    return Fixture(release, devices, messages[0], info.total_size, sum(len(m) for m in messages))


@contextlib.contextmanager
def stream_server(
    env: Environment, fixture: Fixture, config: Path | None = None
) -> Iterator[tuple[int, int]]:
    """The bare stream server for ``fixture``'s payload, configured by ``config`` (default: the KMS's);
    yields its port and process id."""
    info_file = env.root / "payload-info.bin"
    info_file.write_bytes(fixture.info)
    args = ["--info-file", str(info_file), "--payload-size", str(fixture.payload_size)]
    config = config or env.kms.config
    with server_process("bench.payloads", config, args, env.root / "stream.log") as (port, process):
        yield port, process.pid


def _rotated(items: Sequence[str], repetition: int) -> list[str]:
    shift = repetition % len(items)
    return [*items[shift:], *items[:shift]]


# -- throughput ---------------------------------------------------------------------------------------------


def throughput_benchmark(
    env: Environment, pool: WorkerPool, fixture: Fixture, stream_port: int, plan: Plan
) -> list[Comparison]:
    kms = env.endpoint("distribution-server")
    bare = env.endpoint("distribution-server", f"localhost:{stream_port}")
    size = f"{fixture.payload_size / MIB:.1f} MiB"
    subject = Series(f"KMS GetPayload FKSP_V1 {size}, 4 KiB segments, 1 client", "MiB/s")
    baseline = Series("bare gRPC server stream, same bytes, 64 KiB messages, 1 client", "MiB/s")
    library = Series("KMS GetPayload through KmsClient.get_payload, 1 client", "MiB/s")
    fetches: dict[str, tuple[Series, FetchPayloads]] = {}
    paths: list[tuple[str, Series, Endpoint, str, Literal["raw", "kmsctl"]]] = [
        ("kms", subject, kms, GET_PAYLOAD_METHOD, "raw"),
        ("bare", baseline, bare, STREAM_METHOD, "raw"),
        ("kmsctl", library, kms, GET_PAYLOAD_METHOD, "kmsctl"),
    ]
    for name, series, endpoint, method, via in paths:
        fetch = FetchPayloads(
            endpoint, method, fixture.devices, fixture.release, fixture.payload_size, plan.downloads, 0.0, via
        )
        fetches[name] = (series, fetch)
    for repetition in range(plan.repetitions):
        for name in _rotated(list(fetches), repetition):
            series, fetch = fetches[name]
            start = time.monotonic() + _START_LEAD
            (done,) = pool.run([dataclasses.replace(fetch, start_at=start)])
            expected = plan.downloads * (
                fixture.payload_size if fetch.via == "kmsctl" else fixture.wire_bytes
            )
            if done.count != expected:
                raise BenchError(f"{name}: received {done.count} bytes, expected {expected}")
            series.samples.append(plan.downloads * fixture.payload_size / MIB / (done.ended - done.began))
        log(
            f"  repetition {repetition + 1}/{plan.repetitions}: KMS {subject.samples[-1]:.0f} MiB/s, "
            f"bare stream {baseline.samples[-1]:.0f} MiB/s, KmsClient {library.samples[-1]:.0f} MiB/s"
        )
    note = (
        f"{plan.downloads} whole {size} payloads per sample, one client process, a different device each; "
        "same messages on the wire"
    )
    return [
        Comparison("payload MiB/s, 1 client vs bare stream", subject, baseline, THROUGHPUT_TARGET, note),
        Comparison(
            "payload MiB/s via KmsClient vs bare stream",
            library,
            baseline,
            None,
            "for information: includes the client library's checks and copies",
        ),
    ]


# -- derivations --------------------------------------------------------------------------------------------


def _kek_blobs(env: Environment) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The KEK's HSM id and every registered device's wrapped secret, read from the KMS database."""
    database = load_config(env.kms.config).database
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        rows = connection.execute(
            "SELECT d.device_id, d.wrapped_secret, v.hsm_id FROM devices d JOIN key_versions v "
            "ON v.key_id = d.kek_key_id AND v.version = d.kek_version WHERE d.product = ? "
            "ORDER BY d.device_id",
            [PRODUCT],
        ).fetchall()
    keks = {bytes(row[2]) for row in rows}
    if len(keks) != 1:
        raise BenchError(f"expected the devices under one KEK version, found {len(keks)}")
    return keks.pop(), [(str(row[0]), bytes(row[1])) for row in rows]


def _derivation_message(device_id: str) -> bytes:
    """An HMAC message of the length and form of ``sealed.key_derivation_info(...) + 0x01``."""
    identity = device_id.encode("ascii")
    return b"FKSP/1 payload key\x00" + bytes([len(identity)]) + identity + os.urandom(64) + b"\x01"


def derivation_benchmark(
    env: Environment, pool: WorkerPool, fixture: Fixture, plan: Plan
) -> list[Comparison]:
    config = load_config(env.kms.config)
    if config.softhsm2_conf is None:
        raise BenchError("the benchmark needs the SoftHSM2 token that `kms init` creates")
    setup = HsmSetup(config.hsm_uri, str(config.softhsm2_conf))
    kek_hsm_id, devices = _kek_blobs(env)
    blobs = tuple(blob for _, blob in devices)
    messages = tuple(_derivation_message(device) for device, _ in devices)

    def derive(path: Literal["service", "raw"], start: float, end: float) -> Done:
        command = Derivations(path, setup, kek_hsm_id, blobs, messages, start, end)
        index = 0 if path == "service" else 1
        answers = pool.run([_Idle()] * index + [command])
        return answers[index]

    keys = [derive(path, 0, 0).samples["key"] for path in ("service", "raw")]
    if keys[0] != keys[1] or len(keys[0]) != 32:
        raise BenchError("the service path and the bare python-pkcs11 loop derive different keys")
    tail = tuple(
        payload_request(device, fixture.release, fixture.payload_size - 1) for device in fixture.devices
    )
    kms = env.endpoint("distribution-server")
    subject = Series("Pkcs11Hsm.hmac_with_wrapped_secret, in process", "keys/s")
    baseline = Series("bare python-pkcs11 loop: unwrap, sign, destroy, KEK handle cached", "keys/s")
    rpc = Series(f"GetPayload with offset = total_size - 1, {plan.rpc_clients} client processes", "calls/s")
    runs: dict[str, Callable[[float, float], float]] = {
        "service": lambda start, end: derive("service", start, end).count / (end - start),
        "raw": lambda start, end: derive("raw", start, end).count / (end - start),
        "rpc": lambda start, end: (
            sum(d.count for d in pool.run([TinyPayloads(kms, tail, start, end)] * plan.rpc_clients))
            / (end - start)
        ),
    }
    series = {"service": subject, "raw": baseline, "rpc": rpc}
    for repetition in range(plan.repetitions):
        for name in _rotated(list(runs), repetition):
            start = time.monotonic() + _START_LEAD
            series[name].samples.append(runs[name](start, start + plan.derivation_seconds))
        log(
            f"  repetition {repetition + 1}/{plan.repetitions}: service path {subject.samples[-1]:,.0f}/s, "
            f"bare python-pkcs11 {baseline.samples[-1]:,.0f}/s, GetPayload {rpc.samples[-1]:,.0f}/s"
        )
    note = (
        f"{plan.derivation_seconds:g} s windows, {len(blobs)} real KEK blobs, same token, one process each "
        "(kms serve idle)"
    )
    return [
        Comparison(
            "payload keys/s, service HSM path vs bare python-pkcs11",
            subject,
            baseline,
            DERIVATION_TARGET,
            note,
        ),
        Comparison(
            f"payload keys/s via GetPayload (tiny stream), {plan.rpc_clients} clients vs bare python-pkcs11",
            rpc,
            baseline,
            None,
            "for information: the whole RPC, including the key-use record written before the stream starts",
        ),
    ]


@dataclass(frozen=True)
class _Idle:
    """A command for a worker that has nothing to do in a measurement."""

    def run_in(self, worker: Worker) -> Done:
        now = time.monotonic()
        return Done(0, now, now)


# -- memory -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySample:
    at: float
    rss: float
    anon: float
    file: float
    pss: float
    uss: float


def memory_of(pid: int) -> MemorySample:
    """The process's memory now, in bytes (NaN where the kernel does not say)."""
    status: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            status[name] = float(value.split()[0]) * 1024
    rollup: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, value = line.partition(":")
            rollup[name] = float(value.split()[0]) * 1024
    return MemorySample(
        at=time.monotonic(),
        rss=status.get("VmRSS", math.nan),
        anon=status.get("RssAnon", math.nan),
        file=status.get("RssFile", math.nan),
        pss=rollup.get("Pss", math.nan),
        uss=rollup.get("Private_Clean", math.nan) + rollup.get("Private_Dirty", math.nan),
    )


@dataclass
class MemoryWatch:
    """Samples a process's memory every ``interval`` seconds on a thread while the block runs."""

    pid: int
    interval: float = 0.1
    samples: list[MemorySample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.samples.append(memory_of(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, name: str) -> float:
        return max((float(getattr(s, name)) for s in self.samples), default=math.nan)

    def median(self, name: str) -> float:
        values = [float(getattr(s, name)) for s in self.samples]
        return statistics.median(values) if values else math.nan


_MEMORY_FIELDS = ("rss", "anon", "file", "pss", "uss")


def _idle_memory(pid: int, seconds: float = 2.0) -> dict[str, float]:
    """The median of each figure over ``seconds`` at rest."""
    with MemoryWatch(pid) as watch:
        time.sleep(seconds)
    return {name: watch.median(name) for name in _MEMORY_FIELDS}


@dataclass
class _Round:
    growth: dict[str, float]
    idle: dict[str, float]
    peak: dict[str, float]
    started_together: int
    """Streams whose first message came within half a stream's reading time of the start: the others
    waited for a server thread."""
    seconds: float
    last_first_byte: float


def _memory_round(
    pool: WorkerPool,
    pid: int,
    endpoint: Endpoint,
    method: str,
    fixture: Fixture,
    plan: Plan,
    idle: dict[str, float],
) -> _Round:
    requests = [payload_request(device, fixture.release) for device in fixture.devices]
    per = plan.streams_per_process
    start = time.monotonic() + _STREAMS_LEAD
    commands = [
        SlowStreams(
            endpoint, method, tuple(requests[i : i + per]), fixture.wire_bytes, plan.stream_seconds, start
        )
        for i in range(0, CONCURRENT_STREAMS, per)
    ]
    with MemoryWatch(pid) as watch:
        done = pool.run(commands)
        time.sleep(0.3)
    if any(int(b) != fixture.wire_bytes for answer in done for b in answer.samples["bytes"]):
        raise BenchError("a slow stream did not receive the whole payload")
    firsts = [first - start for answer in done for first in answer.samples["first"]]
    peak = {name: watch.peak(name) for name in _MEMORY_FIELDS}
    return _Round(
        growth={name: peak[name] - idle[name] for name in _MEMORY_FIELDS},
        idle=idle,
        peak=peak,
        started_together=sum(first < plan.stream_seconds / 2 for first in firsts),
        seconds=max(d.ended for d in done) - start,
        last_first_byte=max(firsts),
    )


def _round_json(r: _Round) -> dict[str, object]:
    return {
        "growth_bytes": r.growth,
        "idle_bytes": r.idle,
        "peak_bytes": r.peak,
        "streams_started_together": r.started_together,
        "seconds": r.seconds,
        "last_first_byte_seconds": r.last_first_byte,
    }


def _config_with_workers(config: Path, workers: int) -> Path:
    """A copy of ``kms.toml`` beside it (same state: database, token, PKI) with ``[server] workers``."""
    text, count = re.subn(r"(?m)^workers\s*=\s*\d+", f"workers = {workers}", config.read_text())
    if count != 1:
        raise BenchError(f"{config} has no single 'workers =' line to change")
    path = config.with_name(f"kms-workers-{workers}.toml")
    path.write_text(text)
    return path


def _measure_server(
    label: str,
    pool: WorkerPool,
    pid: int,
    endpoint: Endpoint,
    method: str,
    fixture: Fixture,
    plan: Plan,
    rounds: int,
    *,
    warm_up: bool,
) -> tuple[dict[str, float], list[_Round]]:
    """Warm up (two whole downloads), measure at rest, then ``rounds`` rounds of 32 streams."""
    if warm_up:
        fetch = FetchPayloads(
            endpoint, method, fixture.devices, fixture.release, fixture.payload_size, 2, time.monotonic()
        )
        pool.run([fetch])
    idle = _idle_memory(pid)
    log(
        f"  {label} at rest: RSS {idle['rss'] / MIB:.1f} MiB (anon {idle['anon'] / MIB:.1f}, file "
        f"{idle['file'] / MIB:.1f}), PSS {idle['pss'] / MIB:.1f}, USS {idle['uss'] / MIB:.1f}"
    )
    results = []
    for n in range(rounds):
        result = _memory_round(pool, pid, endpoint, method, fixture, plan, idle)
        results.append(result)
        log(
            f"  {label}, round {n + 1}/{rounds}: RSS +{result.growth['rss'] / MIB:.1f} MiB (anon "
            f"+{result.growth['anon'] / MIB:.1f}, file +{result.growth['file'] / MIB:.1f}), PSS "
            f"+{result.growth['pss'] / MIB:.1f}, USS +{result.growth['uss'] / MIB:.1f}; "
            f"{result.started_together} of {CONCURRENT_STREAMS} streams started together, the last first "
            f"byte after {result.last_first_byte:.1f} s, all done after {result.seconds:.1f} s"
        )
    return idle, results


def memory_benchmark(
    env: Environment, pool: WorkerPool, fixture: Fixture, plan: Plan
) -> tuple[list[Limit], dict[str, object]]:
    """Server memory under 32 slow concurrent downloads: the KMS as ``kms init`` configures it, the KMS
    with enough threads for 32 streams at once (``workers``; the same state), the bare stream server with
    that configuration (see the module docstring)."""
    if len(fixture.devices) < CONCURRENT_STREAMS:
        raise BenchError(f"{CONCURRENT_STREAMS} streams need as many devices")
    workers = load_config(env.kms.config).limits.workers
    wide_config = _config_with_workers(env.kms.config, WIDE_WORKERS)
    kms = env.endpoint("distribution-server")
    details: dict[str, object] = {"default_workers": workers, "wide_workers": WIDE_WORKERS}

    _idle, default_rounds = _measure_server(
        f"KMS (workers = {workers})",
        pool,
        env.kms.process.pid,
        kms,
        GET_PAYLOAD_METHOD,
        fixture,
        plan,
        plan.memory_rounds,
        warm_up=False,  # the throughput benchmark has downloaded many payloads already
    )
    log_path = env.root / "kms-wide.log"
    with server_process("kms.cli", wide_config, [], log_path, subcommand="serve") as (port, process):
        wide = env.endpoint("distribution-server", f"localhost:{port}")
        wide_idle, wide_rounds = _measure_server(
            f"KMS (workers = {WIDE_WORKERS})",
            pool,
            process.pid,
            wide,
            GET_PAYLOAD_METHOD,
            fixture,
            plan,
            plan.memory_rounds,
            warm_up=True,
        )
    with stream_server(env, fixture, wide_config) as (port, pid):
        bare = env.endpoint("distribution-server", f"localhost:{port}")
        _bare_idle, bare_rounds = _measure_server(
            f"bare stream server (workers = {WIDE_WORKERS})",
            pool,
            pid,
            bare,
            STREAM_METHOD,
            fixture,
            plan,
            1,
            warm_up=True,
        )
    details["default"] = [_round_json(r) for r in default_rounds]
    details["wide"] = [_round_json(r) for r in wide_rounds]
    details["bare"] = [_round_json(r) for r in bare_rounds]

    def growth(name: str, label: str, rounds: list[_Round], what: str) -> Series:
        return Series(
            f"{what} {label} growth, {CONCURRENT_STREAMS} streams",
            "MiB",
            [r.growth[name] / MIB for r in rounds],
        )

    together = min(r.started_together for r in wide_rounds)
    size = f"{fixture.payload_size / MIB:.0f} MiB"
    note = (
        f"peak during {CONCURRENT_STREAMS} concurrent {size} downloads minus the median at rest after "
        f"warm-up ({wide_idle['rss'] / MIB:.0f} MiB RSS); {together} of {CONCURRENT_STREAMS} streams in "
        "flight at once"
    )
    wide_what = f"KMS (workers = {WIDE_WORKERS})"
    limits = [
        Limit(
            f"KMS RSS growth, {CONCURRENT_STREAMS} concurrent {size} payloads, workers = {WIDE_WORKERS}",
            growth("rss", "RSS", wide_rounds, wide_what),
            MEMORY_TARGET_MIB,
            worst=True,
            note=note,
        )
    ]
    for name, label in (("anon", "anonymous RSS"), ("pss", "PSS"), ("uss", "USS")):
        limits.append(
            Limit(
                f"  the same, {label}",
                growth(name, label, wide_rounds, wide_what),
                None,
                worst=True,
                note="for information: without the image's page-cache pages (memory-mapped, shared)",
            )
        )
    default_together = min(r.started_together for r in default_rounds)
    limits.append(
        Limit(
            f"KMS RSS growth, same streams, workers = {workers} (as kms init writes it)",
            growth("rss", "RSS", default_rounds, f"KMS (workers = {workers})"),
            None,
            worst=True,
            note=(
                f"for information: {default_together} of {CONCURRENT_STREAMS} streams in flight at once, the "
                "others wait for a server thread"
            ),
        )
    )
    limits.append(
        Limit(
            f"bare stream server RSS growth, same streams, workers = {WIDE_WORKERS}",
            growth("rss", "RSS", bare_rounds, "bare stream server"),
            None,
            worst=True,
            note="for information: what gRPC itself holds for the same streams",
        )
    )
    return limits, details


# -- all of it ----------------------------------------------------------------------------------------------


def payloads_benchmark(
    env: Environment, pool: WorkerPool, plan: Plan
) -> tuple[list[Comparison], list[Limit], dict[str, object]]:
    """Throughput, derivations and memory (see the module docstring) on ``env`` (which must have the
    ``PAYLOAD_KEY`` and the product set of ``PRODUCT``) with ``pool`` (``plan.processes`` workers)."""
    fixture = prepare(env)
    with stream_server(env, fixture) as (port, _pid):
        log(f"payloads: throughput, {plan.repetitions} repetitions of {plan.downloads} downloads")
        comparisons = throughput_benchmark(env, pool, fixture, port, plan)
        log(f"payloads: key derivations, {plan.repetitions} repetitions of {plan.derivation_seconds:g} s")
        comparisons += derivation_benchmark(env, pool, fixture, plan)
    log(f"payloads: server memory, {CONCURRENT_STREAMS} concurrent streams")
    limits, details = memory_benchmark(env, pool, fixture, plan)
    details["payload_bytes"] = fixture.payload_size
    details["wire_bytes_per_download"] = fixture.wire_bytes
    return comparisons, limits, details


if __name__ == "__main__":
    raise SystemExit(main())
