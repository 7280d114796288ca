"""The two comparisons the issue asks for.

Images (``images_benchmark``)
    1.5 MiB ESP app images, all different (the service returns the stored release for an image it signed
    before, and that is not what is measured here; a reused release fails the run). Baseline: ``espsecure
    sign-data --version 2 --hsm --hsm-config INI`` run sequentially, one process per image, as build
    scripts run it, with the same key in the same SoftHSM2 token. Subject: ``KmsClient.sign_image`` (upload,
    signing, download of the signed image, all client-side checks) from one client process signing images
    one after the other, and from 4 client processes at once. Each repetition runs the three in turn, the
    order rotating from one repetition to the next. Before timing, one output of each path is checked with
    ``espsecure verify-signature``, so both baselines are real signings.

Digests (``digest_benchmark``)
    8 client processes make unary calls back to back for a fixed time. Subject: SignDigest on the KMS
    (P-256 digest-signing key); baseline: the bare echo server of ``bench.echo`` answering with a real
    SignDigestResponse's bytes. Both clients send the same serialized SignDigestRequest bytes through the
    same raw channel code (no client-side protobuf work on either side), so the difference is the
    service's. A third series runs ``KmsClient.sign_digest`` (protobuf and CRC32C checks in the client) for
    information. Interleaved and rotated like the images.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench.common import (
    IMAGE_SIZE,
    BenchError,
    CallKind,
    CallLoop,
    Comparison,
    Environment,
    ImageKey,
    PrepareImages,
    Series,
    SignImages,
    WorkerPool,
    log,
)
from tests.support.esp_images import build_app_image

IMAGES_TARGET = 50.0
DIGEST_TARGET = 0.5
_START_LEAD = 1.0
"""Seconds between sending a timed command and its start: room for the workers to warm up."""

_seeds = itertools.count(1)


@dataclass(frozen=True)
class Plan:
    repetitions: int
    espsecure_images: int
    """Images per repetition for espsecure (one process each, sequential)."""
    service_images: int
    """Images per repetition for the single sequential client."""
    concurrent_clients: int
    concurrent_images: int
    """Images per client per repetition when ``concurrent_clients`` sign at once."""
    digest_clients: int
    digest_seconds: float
    """Length of one timed window of digest calls."""


FULL = Plan(
    repetitions=5,
    espsecure_images=10,
    service_images=40,
    concurrent_clients=4,
    concurrent_images=15,
    digest_clients=8,
    digest_seconds=5.0,
)
QUICK = Plan(
    repetitions=2,
    espsecure_images=3,
    service_images=6,
    concurrent_clients=4,
    concurrent_images=3,
    digest_clients=8,
    digest_seconds=1.0,
)


def espsecure_path() -> str:
    beside = Path(sys.executable).parent / "espsecure"
    found = str(beside) if beside.exists() else shutil.which("espsecure")
    if found is None:
        raise BenchError("espsecure is not installed (pip install 'esptool[hsm]')")
    return found


def _espsecure(env: Environment, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [espsecure_path(), *args], capture_output=True, env=env.tool_env(), check=False, timeout=300
    )


def espsecure_sign(env: Environment, key: ImageKey, image: Path, output: Path) -> None:
    ini = env.hsm_config(key)
    result = _espsecure(
        env, "sign-data", "--version", "2", "--hsm", "--hsm-config", str(ini), "-o", str(output), str(image)
    )
    if result.returncode != 0:
        raise BenchError(
            f"espsecure sign-data failed ({result.returncode}):\n{result.stdout.decode(errors='replace')}"
        )


def espsecure_verify(env: Environment, key: ImageKey, signed: Path) -> None:
    pem = env.public_keys[key.name]
    result = _espsecure(env, "verify-signature", "--version", "2", "--keyfile", str(pem), str(signed))
    if result.returncode != 0:
        raise BenchError(
            f"espsecure verify-signature refused {signed.name}:\n{result.stdout.decode(errors='replace')}"
        )


def _write_images(env: Environment, key: ImageKey, count: int) -> list[Path]:
    paths = []
    for _ in range(count):
        seed = next(_seeds)
        path = env.root / f"image-{seed}.bin"
        path.write_bytes(build_app_image(key.chip, IMAGE_SIZE, seed=seed))
        paths.append(path)
    return paths


def check_both_paths(env: Environment, key: ImageKey) -> None:
    """One image through each path, verified by espsecure with the key's public key from the service."""
    (image,) = _write_images(env, key, 1)
    out = image.with_suffix(".espsecure-signed")
    espsecure_sign(env, key, image, out)
    espsecure_verify(env, key, out)
    with env.kms.client() as client:
        signed = client.sign_image(key.product, image, output=image.with_suffix(".kms-signed"))
    assert signed.path is not None
    espsecure_verify(env, key, signed.path)
    for path in (image, out, signed.path):
        path.unlink()


def _espsecure_rate(env: Environment, key: ImageKey, count: int) -> float:
    images = _write_images(env, key, count)
    outputs = [image.with_suffix(".signed") for image in images]
    began = time.perf_counter()
    for image, output in zip(images, outputs, strict=True):
        espsecure_sign(env, key, image, output)
    elapsed = time.perf_counter() - began
    for path in (*images, *outputs):
        path.unlink()
    return count / elapsed


def _service_rate(
    pool: WorkerPool, key: ImageKey, clients: int, per_client: int, via: Literal["kms", "echo"] = "kms"
) -> float:
    prepare = [
        PrepareImages(key.chip, IMAGE_SIZE, tuple(next(_seeds) for _ in range(per_client)))
        for _ in range(clients)
    ]
    pool.run(prepare)
    start = time.monotonic() + _START_LEAD
    results = pool.run([SignImages(key.product, start, via)] * clients)
    began = min(r.began for r in results)
    ended = max(r.ended for r in results)
    return sum(r.count for r in results) / (ended - began)


def _rotated(items: Sequence[str], repetition: int) -> list[str]:
    shift = repetition % len(items)
    return [*items[shift:], *items[:shift]]


def images_benchmark(env: Environment, pool: WorkerPool, key: ImageKey, plan: Plan) -> list[Comparison]:
    log(f"images {key.label}: checking that espsecure verifies both paths' output")
    check_both_paths(env, key)
    baseline = Series(f"espsecure sign-data --hsm, {key.label}, 1 process per image", "images/s")
    sequential = Series(f"KMS SignImage, {key.label}, 1 client", "images/s")
    concurrent = Series(f"KMS SignImage, {key.label}, {plan.concurrent_clients} clients", "images/s")
    transport = Series("bare gRPC stream echo of the same images, 1 client", "images/s")
    runs: dict[str, Callable[[], float]] = {
        "espsecure": lambda: _espsecure_rate(env, key, plan.espsecure_images),
        "service-1": lambda: _service_rate(pool, key, 1, plan.service_images),
        "service-n": lambda: _service_rate(pool, key, plan.concurrent_clients, plan.concurrent_images),
        "transport": lambda: _service_rate(pool, key, 1, plan.service_images, via="echo"),
    }
    series = {"espsecure": baseline, "service-1": sequential, "service-n": concurrent, "transport": transport}
    for repetition in range(plan.repetitions):
        for name in _rotated(list(runs), repetition):
            series[name].samples.append(runs[name]())
        log(
            f"  repetition {repetition + 1}/{plan.repetitions}: espsecure {baseline.samples[-1]:.2f}/s, "
            f"1 client {sequential.samples[-1]:.1f}/s, {plan.concurrent_clients} clients "
            f"{concurrent.samples[-1]:.1f}/s, stream echo {transport.samples[-1]:.1f}/s"
        )
    note = f"{IMAGE_SIZE // 1024} KiB images, all different; same key in the same SoftHSM2 token"
    return [
        Comparison(f"images/s {key.label}, 1 client vs espsecure", sequential, baseline, IMAGES_TARGET, note),
        Comparison(
            f"images/s {key.label}, {plan.concurrent_clients} clients vs espsecure",
            concurrent,
            baseline,
            IMAGES_TARGET,
            note,
        ),
        Comparison(
            f"images/s {key.label}: transport ceiling vs espsecure",
            transport,
            baseline,
            None,
            "for information: upload and download of the image over the same mTLS gRPC, nothing else",
        ),
    ]


def _calls_rate(pool: WorkerPool, kind: CallKind, plan: Plan) -> float:
    start = time.monotonic() + _START_LEAD
    results = pool.run([CallLoop(kind, start, start + plan.digest_seconds)] * plan.digest_clients)
    late = sum(r.late for r in results)
    if late:
        log(f"  note: {late} of {len(results)} clients were still warming up at the start of the window")
    return sum(r.count for r in results) / plan.digest_seconds


def digest_benchmark(pool: WorkerPool, plan: Plan) -> list[Comparison]:
    clients = plan.digest_clients
    subject = Series(f"KMS SignDigest, P-256, {clients} client processes", "calls/s")
    baseline = Series(f"bare gRPC unary echo, same sizes, {clients} client processes", "calls/s")
    library = Series(f"KMS SignDigest through KmsClient, {clients} client processes", "calls/s")
    series: dict[CallKind, Series] = {"echo": baseline, "sign-digest": subject, "kmsctl": library}
    kinds: list[CallKind] = ["echo", "sign-digest", "kmsctl"]
    for repetition in range(plan.repetitions):
        shift = repetition % len(kinds)
        for kind in [*kinds[shift:], *kinds[:shift]]:
            series[kind].samples.append(_calls_rate(pool, kind, plan))
        log(
            f"  repetition {repetition + 1}/{plan.repetitions}: echo {baseline.samples[-1]:,.0f}/s, "
            f"SignDigest {subject.samples[-1]:,.0f}/s, via KmsClient {library.samples[-1]:,.0f}/s"
        )
    note = f"{clients} client processes, {plan.digest_seconds:g} s windows, same request bytes"
    return [
        Comparison(f"digest calls/s, {clients} clients vs echo", subject, baseline, DIGEST_TARGET, note),
        Comparison(
            f"digest calls/s via KmsClient, {clients} clients vs echo",
            library,
            baseline,
            None,
            "for information: includes the client library's protobuf work and CRC32C checks",
        ),
    ]
