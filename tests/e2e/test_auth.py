"""Mutual TLS and roles: who can connect, and who can sign."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kms.server.pki import issue, make_ca
from kmsapi.v1 import common_pb2, keys_pb2, keys_pb2_grpc, signing_pb2, signing_pb2_grpc
from kmsctl import KmsClient, PermissionDeniedError, RetryPolicy
from tests.support.esp_images import build_app_image
from tests.support.kms_server import RunningKms


def _list_keys(channel: grpc.Channel) -> keys_pb2.ListKeysResponse:
    return keys_pb2_grpc.KeyServiceStub(channel).ListKeys(keys_pb2.ListKeysRequest(), timeout=10)


def test_no_client_certificate_is_refused(kms_server: RunningKms) -> None:
    ca = kms_server.credentials()["ca"].read_bytes()
    credentials = grpc.ssl_channel_credentials(ca)
    with (
        grpc.secure_channel(kms_server.target, credentials) as channel,
        pytest.raises(grpc.RpcError) as error,
    ):
        _list_keys(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_plaintext_is_refused(kms_server: RunningKms) -> None:
    with grpc.insecure_channel(kms_server.target) as channel, pytest.raises(grpc.RpcError) as error:
        _list_keys(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def _pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_certificate_from_another_ca_is_refused(kms_server: RunningKms) -> None:
    rogue_key, rogue_ca = make_ca("rogue CA")
    key, cert = issue(
        rogue_key,
        rogue_ca,
        "build-server",
        [x509.UniformResourceIdentifier("spiffe://kms.dev/build-server/dev")],
        server=False,
    )
    creds = grpc.ssl_channel_credentials(
        kms_server.credentials()["ca"].read_bytes(), _pem(key), cert.public_bytes(serialization.Encoding.PEM)
    )
    with grpc.secure_channel(kms_server.target, creds) as channel, pytest.raises(grpc.RpcError) as error:
        _list_keys(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_without_identity_is_unauthenticated(kms_server: RunningKms, tmp_path: Path) -> None:
    ca_key = serialization.load_pem_private_key((kms_server.state_dir / "pki" / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(kms_server.credentials()["ca"].read_bytes())
    key, cert = issue(ca_key, ca_cert, "anonymous", [x509.DNSName("ci.example")], server=False)  # type: ignore[arg-type]
    creds = grpc.ssl_channel_credentials(
        kms_server.credentials()["ca"].read_bytes(), _pem(key), cert.public_bytes(serialization.Encoding.PEM)
    )
    with grpc.secure_channel(kms_server.target, creds) as channel, pytest.raises(grpc.RpcError) as error:
        _list_keys(channel)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("role", ["auditor", "security-officer", "distribution-server", "factory-registrar"])
def test_only_build_servers_sign(kms_server: RunningKms, role: str) -> None:
    with kms_server.client(role) as kms:
        assert kms.get_public_key("keys/p256-1-slot0").pem  # reading public keys is open to every role
        with pytest.raises(PermissionDeniedError, match="may not call"):
            kms.sign_digest("keys/artifacts-p256", hashlib.sha256(b"x").digest())
        with pytest.raises(PermissionDeniedError, match="may not call"):
            kms.sign_image("p256-1", build_app_image("esp32c6", 10_000))


def test_streaming_call_is_checked_before_any_message(kms_server: RunningKms) -> None:
    """The interceptor covers streaming methods: an auditor's SignImage fails with no request sent."""
    creds = kms_server.credentials("auditor")
    channel_creds = grpc.ssl_channel_credentials(
        creds["ca"].read_bytes(), creds["key"].read_bytes(), creds["cert"].read_bytes()
    )
    with grpc.secure_channel(kms_server.target, channel_creds) as channel:
        stub = signing_pb2_grpc.SigningServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.SignImage(iter([]), timeout=10))
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as error:
            stub.SignDigest(
                signing_pb2.SignDigestRequest(
                    name="keys/artifacts-p256", digest=common_pb2.Digest(sha256=bytes(32))
                ),
                timeout=10,
            )
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_client_library_over_mtls_uses_the_dev_pki(kms_server: RunningKms) -> None:
    files = kms_server.credentials()
    retries = RetryPolicy(max_attempts=1)
    with KmsClient.from_files(
        kms_server.target, ca=files["ca"], cert=files["cert"], key=files["key"], retries=retries
    ) as kms:
        assert any(k.name == "keys/artifacts-p256" for k in kms.list_keys())
