"""Unit tests of the server edge with fakes: configuration, identities, health, error mapping."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from kms.domain import errors
from kms.domain.identity import Role
from kms.server.auth import METHOD_ROLES, caller_from_auth_context
from kms.server.config import load_config
from kms.server.errors import status_of
from kms.server.health import HsmHealth
from kmsapi.v1 import devices_pb2, keys_pb2, signing_pb2

MINIMAL = """
[tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
[hsm]
uri = "pkcs11:token=t?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:PIN"
"""


def test_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "kms.toml"
    path.write_text(MINIMAL)
    config = load_config(path)
    assert config.listen == "127.0.0.1:50051"
    assert config.limits.max_image_bytes == 16 * 1024 * 1024
    assert config.limits.max_concurrent_rpcs == 64
    assert config.tls_cert == tmp_path / "pki" / "server.pem"
    assert config.database == tmp_path / "kms.db"
    assert config.softhsm2_conf is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[server]\nworkers = 0\n", "workers must be positive"),
        ("[server]\nmax_image_bytes = 'big'\n", "max_image_bytes must be a int"),
        ("[surprise]\nx = 1\n", "unknown section"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "kms.toml"
    path.write_text(MINIMAL + extra)
    with pytest.raises(errors.InvalidArgument, match=message):
        load_config(path)


def test_config_missing_required(tmp_path: Path) -> None:
    path = tmp_path / "kms.toml"
    path.write_text("[tls]\ncert = 'a'\n")
    with pytest.raises(errors.InvalidArgument, match=r"\[tls\] key is required"):
        load_config(path)


def _context(*sans: bytes, security: bytes = b"ssl") -> dict[str, list[bytes]]:
    return {"transport_security_type": [security], "x509_subject_alternative_name": list(sans)}


def test_identity_from_spiffe_san() -> None:
    caller = caller_from_auth_context(_context(b"ci.example", b"spiffe://kms.dev/build-server/ci-7"))
    assert caller.role is Role.BUILD_SERVER and caller.identity == "spiffe://kms.dev/build-server/ci-7"


@pytest.mark.parametrize(
    "context",
    [
        _context(b"spiffe://kms.dev/janitor/x"),
        _context(b"spiffe://kms.dev/build-server"),
        _context(b"ci.example"),
        _context(b"spiffe://kms.dev/build-server/x", security=b"insecure"),
    ],
)
def test_unusable_identities_are_unauthenticated(context: dict[str, list[bytes]]) -> None:
    with pytest.raises(errors.Unauthenticated):
        caller_from_auth_context(context)


def test_every_served_method_is_in_the_authorization_table() -> None:
    served = {
        f"/{service.full_name}/{method.name}"
        for module in (signing_pb2, keys_pb2, devices_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served <= set(METHOD_ROLES), served - set(METHOD_ROLES)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidImage("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.LimitExceeded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.HsmUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.HsmFailure("x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.OutOfRange("x"), grpc.StatusCode.OUT_OF_RANGE),
        (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.KmsError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_mapping(error: errors.KmsError, code: grpc.StatusCode) -> None:
    assert status_of(error) is code


def test_health_follows_the_hsm_probe() -> None:
    state = {"up": True}
    probed = threading.Event()

    def probe() -> bool:
        probed.set()
        if state["up"] is None:
            raise RuntimeError("probe crashed")
        return bool(state["up"])

    health = HsmHealth(probe, ["kmsapi.v1.SigningService"], interval=3600)
    serving = health_pb2.HealthCheckResponse.SERVING

    def status(service: str = "") -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return health.servicer.Check(request, None).status  # type: ignore[no-any-return]

    health.start()
    assert probed.is_set() and status() == serving and status("kmsapi.v1.SigningService") == serving
    state["up"] = False
    assert not health.check_now() and status() == health_pb2.HealthCheckResponse.NOT_SERVING
    state["up"] = None  # type: ignore[assignment]
    assert not health.check_now() and status("kmsapi.v1.SigningService") != serving
    state["up"] = True
    assert health.check_now() and status() == serving
    health.shutdown()
    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
