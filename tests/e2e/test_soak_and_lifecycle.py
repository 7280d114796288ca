"""Concurrency soak, health, and graceful shutdown of a real server process."""

from __future__ import annotations

import hashlib
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kms.domain import sbv2
from tests.support.esp_images import build_app_image
from tests.support.kms_server import KeySpec, RunningKms, image_bytes, running_kms

CONCURRENCY = 32


def _check_image(signed: bytes, image: bytes, public_der: bytes) -> None:
    sector = signed[-4096:]
    padded = signed[:-4096]
    assert padded[: len(image)] == image
    blocks = sbv2.parse_signature_sector(sector)
    assert len(blocks) == 1
    assert blocks[0].public_key_der == public_der
    digest = hashlib.sha256(padded).digest()
    assert sbv2.verify_block(sector[:1216], digest, public_der)


def test_32_concurrent_signing_rpcs(kms_server: RunningKms) -> None:
    """Images and digests signed by 32 concurrent callers: no crash, every signature valid."""
    with kms_server.client() as kms:
        image_key = serialization.load_pem_public_key(kms.get_public_key("keys/p256-1-slot0").pem.encode())
        digest_key = serialization.load_pem_public_key(kms.get_public_key("keys/artifacts-p256").pem.encode())
    assert isinstance(digest_key, ec.EllipticCurvePublicKey)
    image_der = image_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    barrier = threading.Barrier(CONCURRENCY)

    def worker(n: int) -> int:
        with kms_server.client(timeout=120) as kms:
            barrier.wait()
            done = 0
            for round_ in range(4):
                if n % 2 == 0:
                    image = build_app_image("esp32c6", 48_000, secure_version=12, seed=1000 + n * 10 + round_)
                    _check_image(image_bytes(kms.sign_image("p256-1", image)), image, image_der)
                else:
                    digest = hashlib.sha256(f"{n}/{round_}".encode()).digest()
                    sig = kms.sign_digest("keys/artifacts-p256", digest, encoding="der").signature
                    digest_key.verify(sig, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
                done += 1
            return done

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        assert sum(pool.map(worker, range(CONCURRENCY))) == CONCURRENCY * 4
    assert kms_server.process.poll() is None, kms_server.log()


def test_health_reports_serving(kms_server: RunningKms) -> None:
    creds = kms_server.credentials("auditor")
    channel_creds = grpc.ssl_channel_credentials(*(creds[k].read_bytes() for k in ("ca", "key", "cert")))
    with grpc.secure_channel(kms_server.target, channel_creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kmsapi.v1.SigningService", "kmsapi.v1.KeyService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_lets_in_flight_calls_finish(tmp_path: Path) -> None:
    keys = [KeySpec("grace-rsa-0", "grace", "rsa3072-pss", 0)]
    image = build_app_image("esp32s3", 12 * 1024 * 1024, seed=3)
    result: dict[str, object] = {}
    with running_kms(tmp_path / "state", keys) as server:

        def sign() -> None:
            with server.client(timeout=120) as kms:
                try:
                    result["signed"] = kms.sign_image(
                        "grace",
                        image,
                        progress=lambda sent, total: started.set() if sent > total // 2 else None,
                    )
                except Exception as e:  # noqa: BLE001 - reported below
                    result["error"] = e

        started = threading.Event()
        thread = threading.Thread(target=sign)
        thread.start()
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)
        thread.join(120)
        assert server.process.wait(60) == 0, server.log()
    assert "error" not in result, result
    assert len(result["signed"].data) % 4096 == 0  # type: ignore[attr-defined]
    assert "shutting down gracefully" in server.log()


def test_restart_keeps_releases_and_floor(tmp_path: Path) -> None:
    keys = [KeySpec("restart-p256-0", "restart", "ecdsa-p256", 0)]
    state = tmp_path / "state"
    image = build_app_image("esp32c6", 20_000, secure_version=5, seed=8)
    with running_kms(state, keys) as server, server.client() as kms:
        first = kms.sign_image("restart", image)
    with running_kms(state, keys, init=False) as server, server.client() as kms:
        again = kms.sign_image("restart", image)
        assert again.release.reused and again.data == first.data
        from kmsctl import FailedPreconditionError

        with pytest.raises(FailedPreconditionError, match="floor 5"):
            kms.sign_image("restart", build_app_image("esp32c6", 20_000, secure_version=4, seed=9))
