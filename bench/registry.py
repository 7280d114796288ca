"""The device registry at scale: bulk registration of 1,000,000 devices, payload latency as it grows.

Registration (``registry_benchmark``)
    One client process registers devices with ``KmsClient.register_devices`` and its default wrapped
    transport (a random batch key encrypted to the product's registration key, every secret wrapped under
    it with AES key wrap), from a generator of random 32-byte secrets, MAC-style device ids in order. First
    1,000 devices, then (after the latency at 1,000 is measured) the rest up to 1,000,000. The time of both
    calls together is compared with the issue's 10 minutes; the rate is also sampled per 100,000
    acknowledged rows, to show whether it falls as the table grows. ``--quick`` grows to 50,000 devices
    and extrapolates the time for 1,000,000 from the rate of the 49,000 (labelled as such; an
    extrapolation cannot see a slowdown past 50,000).

Latency
    ``GetPayload`` of a small release (a 64 KiB signed image; the whole FKSP_V1 payload is the info and two
    chunk messages) for devices drawn at random without replacement from those registered, one request at
    a time from one client process: the time to the first message (the payload info, sent once the key is
    derived and the manifest signed) and to the end of the stream. Every round asks for a release signed
    for that round, so every request is a device's first for its release (its manifest is signed and
    stored, two key uses are recorded), as when a fleet updates. Measured when 1,000 devices are
    registered, and again after the registry has grown to 1,000,000. A second KMS (its own state, token and
    PKI) with 1,000 devices is measured in the same windows, requests alternating between the two servers,
    so that the report can tell a slower registry from a slower machine: it gives the noise floor (two
    servers with 1,000 devices each) and a same-window comparison (1,000,000 vs 1,000). A round's p50 and
    p99 are one sample; the table compares the medians over the rounds.
"""

from __future__ import annotations

import itertools
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
    environment,
    log,
)
from kms.server.config import load_config
from kmsapi.v1 import devices_pb2
from kmsctl import DeviceRegistration
from tests.support.esp_images import build_app_image
from tests.support.kms_server import RunningKms, running_kms

PRODUCT = "bench-factory"
REGISTRY_KEY = ImageKey("factory", "ECDSA P-256", "bench-factory-sb0", PRODUCT, "ecdsa-p256", "esp32c6")
SMALL_IMAGE_SIZE = 64 * 1024 - 4096
"""The unsigned image of the latency releases; signed, 64 KiB."""
GET_PAYLOAD_METHOD = "/kmsapi.v1.DistributionService/GetPayload"
REFERENCE_DEVICES = 1000
REGISTRATION_LIMIT_SECONDS = 600.0
LATENCY_TARGET = 1.2
TARGET_DEVICES = 1_000_000
_CALL_TIMEOUT = 120.0


@dataclass(frozen=True)
class Plan:
    devices: int
    """The size the registry grows to."""
    rounds: int
    """Latency rounds per stage; each gives one p50 and one p99 per server."""
    requests: int
    """Requests per round per server (distinct devices)."""
    segment_rows: int
    """Acknowledged rows per sample of the registration rate."""


FULL = Plan(devices=TARGET_DEVICES, rounds=5, requests=200, segment_rows=100_000)
QUICK = Plan(devices=50_000, rounds=2, requests=100, segment_rows=10_000)


def device_id(n: int) -> str:
    """The ``n``-th device: a base MAC in Espressif's OUI, in order (as a factory registers them)."""
    return f"24:6f:28:{n >> 16 & 0xFF:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"


# -- worker tasks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterDevices:
    """Register devices ``first`` .. ``first + count - 1`` with random secrets in one ``register_devices``
    call (wrapped transport). ``samples`` holds the time and the acknowledged rows at every
    acknowledgement, and the worker's CPU seconds."""

    endpoint: Endpoint
    first: int
    count: int

    def run_in(self, worker: Worker) -> Done:
        client = worker.client_for(self.endpoint, _CALL_TIMEOUT)
        times: list[float] = []
        rows: list[float] = []

        def progress(done: int, _total: int | None) -> None:
            times.append(time.monotonic())
            rows.append(float(done))

        registrations = (
            DeviceRegistration(device_id(n), REGISTRY_KEY.chip, os.urandom(32))
            for n in range(self.first, self.first + self.count)
        )
        cpu = time.process_time()
        began = time.monotonic()
        summary = client.register_devices(PRODUCT, registrations, progress=progress)
        ended = time.monotonic()
        if summary.created != self.count:
            raise BenchError(
                f"registered {summary.created} of {self.count} devices "
                f"({summary.unchanged} unchanged, rejected: {summary.rejected[:3]})"
            )
        samples = {"time": times, "rows": rows, "cpu": [time.process_time() - cpu]}
        return Done(summary.created, began, ended, samples=samples)


@dataclass(frozen=True)
class PayloadLatency:
    """One request at a time: ``devices[k][i]``'s payload of ``releases[i]`` from ``endpoints[i]``, the
    servers alternating (their order flips from one device to the next). ``samples["{i}.first"]`` and
    ``samples["{i}.total"]`` are milliseconds to the first message and to the end of each stream."""

    endpoints: tuple[Endpoint, ...]
    releases: tuple[str, ...]
    devices: tuple[tuple[str, ...], ...]
    """Per server, the devices to ask for, in order (all of the same length)."""
    warm_device: str
    """A device outside ``devices``, asked for first to warm each channel up."""

    def run_in(self, worker: Worker) -> Done:
        stubs: list[grpc.UnaryStreamMultiCallable[bytes, bytes]] = [
            worker.channel(endpoint).unary_stream(GET_PAYLOAD_METHOD) for endpoint in self.endpoints
        ]
        for stub, release in zip(stubs, self.releases, strict=True):
            for _ in range(3):
                list(stub(_request(self.warm_device, release), timeout=_CALL_TIMEOUT))
        samples: dict[str, list[float]] = {}
        for i in range(len(stubs)):
            samples[f"{i}.first"] = []
            samples[f"{i}.total"] = []
        began = time.monotonic()
        count = len(self.devices[0])
        for k in range(count):
            order = range(len(stubs)) if k % 2 == 0 else reversed(range(len(stubs)))
            for i in order:
                request = _request(self.devices[i][k], self.releases[i])
                start = time.perf_counter()
                first = 0.0
                received = 0
                for message in stubs[i](request, timeout=_CALL_TIMEOUT):
                    if not first:
                        first = time.perf_counter()
                    received += len(message)
                end = time.perf_counter()
                if received < SMALL_IMAGE_SIZE:
                    raise BenchError(f"a payload stream carried only {received} bytes")
                samples[f"{i}.first"].append((first - start) * 1000)
                samples[f"{i}.total"].append((end - start) * 1000)
        return Done(count * len(stubs), began, time.monotonic(), samples=samples)


def _request(device: str, release: str) -> bytes:
    return devices_pb2.GetPayloadRequest(
        device_id=device, release=release, format=devices_pb2.FKSP_V1
    ).SerializeToString()


# -- set-up -------------------------------------------------------------------------------------------------


def _endpoint(kms: RunningKms, role: str) -> Endpoint:
    creds = kms.credentials(role)
    return Endpoint(kms.target, creds["ca"], creds["cert"], creds["key"])


def _sign_release(kms: RunningKms, seed: int) -> str:
    image = build_app_image(REGISTRY_KEY.chip, SMALL_IMAGE_SIZE, seed=seed)
    with kms.client(timeout=_CALL_TIMEOUT) as client:
        return client.sign_image(PRODUCT, image).release.name


def _register(pool: WorkerPool, kms: RunningKms, first: int, count: int) -> Done:
    (done,) = pool.run([RegisterDevices(_endpoint(kms, "factory-registrar"), first, count)], timeout=7200)
    return done


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _database_bytes(kms: RunningKms) -> int:
    database = load_config(kms.config).database
    return sum(
        path.stat().st_size
        for path in (database, database.with_name(database.name + "-wal"))
        if path.exists()
    )


def _percentile(values: Sequence[float], q: int) -> float:
    """The ``q``-th percentile (inclusive method: with 200 values, p99 lies between the two largest)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


@dataclass
class _Stage:
    """Latency series of one stage (per server: p50 and p99 of each round, first message and end)."""

    label: str
    p50: list[Series]
    p99: list[Series]
    first_p50: list[Series]
    first_p99: list[Series]


_release_seeds = itertools.count(1)


def _latency_stage(
    pool: WorkerPool,
    servers: Sequence[tuple[str, RunningKms, int]],
    plan: Plan,
    rng: random.Random,
    stage: str,
) -> _Stage:
    """``plan.rounds`` rounds of ``plan.requests`` requests per server; ``servers``: (label, server,
    registered devices). Every round asks for a release signed for it, for devices drawn without
    replacement, so every request is a device's first for its release."""
    result = _Stage(stage, [], [], [], [])
    for label, _kms, registered in servers:
        name = f"{label}, {registered:,} devices, {stage}"
        result.p50.append(Series(f"payload latency p50, {name}", "ms"))
        result.p99.append(Series(f"payload latency p99, {name}", "ms"))
        result.first_p50.append(Series(f"first-message latency p50, {name}", "ms"))
        result.first_p99.append(Series(f"first-message latency p99, {name}", "ms"))
    for r in range(plan.rounds):
        seed = next(_release_seeds)
        devices = tuple(
            tuple(device_id(n) for n in rng.sample(range(1, registered), plan.requests))
            for _, _, registered in servers
        )
        probe = PayloadLatency(
            tuple(_endpoint(kms, "distribution-server") for _, kms, _ in servers),
            tuple(_sign_release(kms, seed) for _, kms, _ in servers),
            devices,
            device_id(0),
        )
        (done,) = pool.run([probe])
        for i in range(len(servers)):
            total, first = done.samples[f"{i}.total"], done.samples[f"{i}.first"]
            result.p50[i].samples.append(statistics.median(total))
            result.p99[i].samples.append(_percentile(total, 99))
            result.first_p50[i].samples.append(statistics.median(first))
            result.first_p99[i].samples.append(_percentile(first, 99))
        log(
            f"  {stage}, round {r + 1}/{plan.rounds}: "
            + "; ".join(
                f"{label} p50 {result.p50[i].samples[-1]:.2f} ms, p99 {result.p99[i].samples[-1]:.2f} ms"
                for i, (label, _, _) in enumerate(servers)
            )
        )
    return result


def _segment_rates(done: Done, segment_rows: int) -> list[float]:
    """Devices per second over each ``segment_rows`` acknowledged rows (the last segment may be shorter;
    it is kept if at least half as long)."""
    times = [done.began, *done.samples["time"]]
    rows = [0.0, *done.samples["rows"]]
    rates = []
    start = 0
    for k in range(1, len(rows)):
        covered = rows[k] - rows[start]
        last = k == len(rows) - 1
        if covered >= segment_rows or (last and covered >= segment_rows / 2):
            rates.append(covered / (times[k] - times[start]))
            start = k
    return rates


# -- the benchmark ------------------------------------------------------------------------------------------


def registry_benchmark(
    env: Environment, reference: RunningKms, pool: WorkerPool, plan: Plan
) -> tuple[list[Comparison], list[Limit], dict[str, object]]:
    """Registration and latency (see the module docstring) on ``env``'s KMS, which grows to
    ``plan.devices``, and ``reference``, which keeps 1,000 devices."""
    grown = env.kms
    rng = random.Random(0x1D)
    log(f"registry: registering {REFERENCE_DEVICES:,} devices on each server")
    first_call = _register(pool, grown, 0, REFERENCE_DEVICES)
    _register(pool, reference, 0, REFERENCE_DEVICES)
    small = f"{REFERENCE_DEVICES:,}"
    log(f"registry: payload latency with {small} devices on both servers")
    before = _latency_stage(
        pool,
        [("server A", grown, REFERENCE_DEVICES), ("server B", reference, REFERENCE_DEVICES)],
        plan,
        rng,
        "first stage",
    )

    grow = plan.devices - REFERENCE_DEVICES
    log(f"registry: registering {grow:,} more devices on server A (one register_devices call)")
    server_cpu = _cpu_seconds(grown.process.pid)
    grow_call = _register(pool, grown, REFERENCE_DEVICES, grow)
    server_cpu = _cpu_seconds(grown.process.pid) - server_cpu
    grow_seconds = grow_call.ended - grow_call.began
    grow_rate = grow / grow_seconds
    log(
        f"  {grow:,} devices in {grow_seconds:.1f} s: {grow_rate:,.0f} devices/s (server CPU "
        f"{server_cpu:.0f} s, client CPU {grow_call.samples['cpu'][0]:.0f} s)"
    )
    large = f"{plan.devices:,}"
    log(f"registry: payload latency with {large} devices on server A and {small} on server B")
    after = _latency_stage(
        pool,
        [("server A", grown, plan.devices), ("server B", reference, REFERENCE_DEVICES)],
        plan,
        rng,
        "second stage",
    )

    comparisons: list[Comparison] = []
    note = f"{plan.rounds} rounds of {plan.requests} first requests for random devices; a round's percentile"
    for which, grown_before, grown_after, reference_after, reference_before in (
        ("p50", before.p50[0], after.p50[0], after.p50[1], before.p50[1]),
        ("p99", before.p99[0], after.p99[0], after.p99[1], before.p99[1]),
    ):
        comparisons.append(
            Comparison(
                f"payload latency {which}, {large} vs {small} devices (server A, before and after)",
                grown_after,
                grown_before,
                LATENCY_TARGET,
                note,
                lower_is_better=True,
            )
        )
        comparisons.append(
            Comparison(
                f"payload latency {which}, {large} (A) vs {small} devices (B), same windows",
                grown_after,
                reference_after,
                None,
                "for information: requests alternating between the two servers",
                lower_is_better=True,
            )
        )
        comparisons.append(
            Comparison(
                f"payload latency {which}, {small} (A) vs {small} devices (B): noise floor",
                grown_before,
                reference_before,
                None,
                "for information: two servers with the same registry size, same windows",
                lower_is_better=True,
            )
        )

    total_seconds = (first_call.ended - first_call.began) + grow_seconds
    if plan.devices >= TARGET_DEVICES:
        time_name = f"time to register {plan.devices:,} devices (two calls: {small}, then the rest)"
        time_series = Series(f"registration of {plan.devices:,} devices", "s", [total_seconds])
        time_note = f"{plan.devices / total_seconds:,.0f} devices/s overall"
    else:
        time_name = f"time to register {TARGET_DEVICES:,} devices, EXTRAPOLATED from {grow:,}"
        time_series = Series(
            f"registration of {TARGET_DEVICES:,} devices extrapolated from {grow:,} (quick run)",
            "s",
            [TARGET_DEVICES / grow_rate],
        )
        time_note = f"{grow:,} devices registered at {grow_rate:,.0f}/s; a quick run measures no more"
    rates = Series(
        f"registration rate per {plan.segment_rows:,} acknowledged rows, {REFERENCE_DEVICES:,} to {large}",
        "devices/s",
        _segment_rates(grow_call, plan.segment_rows),
    )
    limits = [
        Limit(time_name, time_series, REGISTRATION_LIMIT_SECONDS, note=time_note),
        Limit(
            "registration rate (one client process, wrapped transport)", rates, None, note="for information"
        ),
    ]
    details: dict[str, object] = {
        "devices": plan.devices,
        "first_call_seconds": first_call.ended - first_call.began,
        "grow_call_seconds": grow_seconds,
        "grow_devices": grow,
        "server_cpu_seconds_while_growing": server_cpu,
        "client_cpu_seconds_while_growing": grow_call.samples["cpu"][0],
        "database_bytes": _database_bytes(grown),
        "first_message_latency_ms": {
            stage.label: {
                "server A": {"p50": stage.first_p50[0].samples, "p99": stage.first_p99[0].samples},
                "server B": {"p50": stage.first_p50[1].samples, "p99": stage.first_p99[1].samples},
            }
            for stage in (before, after)
        },
    }
    log(f"  database of server A: {_database_bytes(grown) / 1e6:,.0f} MB")
    return comparisons, limits, details


def run(plan: Plan, *, keep: bool = False) -> tuple[list[Comparison], list[Limit], dict[str, object]]:
    """Set up both servers (``environment`` for server A, a second ``kms init`` for server B) and one
    client process, then ``registry_benchmark``."""
    with environment([REGISTRY_KEY], keep=keep, product_sets=[PRODUCT]) as env:
        log("registry: a second KMS (server B) with its own state, token and PKI")
        with (
            running_kms(env.root / "reference", [REGISTRY_KEY.spec()], product_sets=[PRODUCT]) as reference,
            WorkerPool(env.worker_setup(), 1) as pool,
        ):
            return registry_benchmark(env, reference, pool, plan)
