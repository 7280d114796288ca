"""Product scope against a real server whose configuration names a policy file (``[policy] file``).

The development build server and distribution server are scoped to product ``p-a``, the development
security officer too; the other identities are not listed and keep every product (``default = "all"``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kmsapi.v1 import devices_pb2, devices_pb2_grpc, keys_pb2, keys_pb2_grpc
from kmsctl import PermissionDeniedError
from tests.support.esp_images import build_app_image
from tests.support.kms_server import KeySpec, RunningKms, init_state, running_kms

A, B = "p-a", "p-b"
CHIP = "esp32c6"
KEYS = [KeySpec(f"{p}-sbv2", p, "ecdsa-p256", 0) for p in (A, B)]
POLICY = f"""
default = "all"

[identities]
"spiffe://kms.dev/build-server/dev" = ["{A}"]
"spiffe://kms.dev/distribution-server/*" = ["{A}"]
"spiffe://kms.dev/security-officer/dev" = ["{A}"]
"""


@pytest.fixture(scope="module")
def scoped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    state: Path = tmp_path_factory.mktemp("kms-scoped")
    init_state(state, KEYS, product_sets=[A, B])
    (state / "policy.toml").write_text(POLICY, encoding="utf-8")
    with (state / "kms.toml").open("a", encoding="utf-8") as config:
        config.write('\n[policy]\nfile = "policy.toml"\n')
    with running_kms(state, KEYS, init=False) as server:
        yield server


def _channel(server: RunningKms, role: str) -> grpc.Channel:
    files = server.credentials(role)
    creds = grpc.ssl_channel_credentials(*(files[k].read_bytes() for k in ("ca", "key", "cert")))
    return grpc.secure_channel(server.target, creds, options=[("grpc.max_receive_message_length", 4 << 20)])


def _denied(error: pytest.ExceptionInfo[grpc.RpcError], product: str) -> None:
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"product {product!r}" in (error.value.details() or "")


def _register(server: RunningKms, product: str) -> str:
    """A device of ``product``, registered by the (unscoped) factory registrar."""
    device_id = f"{product}-{os.urandom(4).hex()}"
    row = devices_pb2.DeviceRow(row=1, device_id=device_id, chip=CHIP, secret=os.urandom(32))

    def requests() -> Iterator[devices_pb2.RegisterDevicesRequest]:
        yield devices_pb2.RegisterDevicesRequest(header=devices_pb2.RegisterDevicesHeader(product=product))
        yield devices_pb2.RegisterDevicesRequest(devices=devices_pb2.DeviceRows(rows=[row]))

    with _channel(server, "factory-registrar") as channel:
        stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        (response,) = list(stub.RegisterDevices(requests(), timeout=60))
    assert response.outcomes[0].status == devices_pb2.RowOutcome.CREATED
    return device_id


def _payload(server: RunningKms, device_id: str, release: str) -> bytes:
    with _channel(server, "distribution-server") as channel:
        stub = devices_pb2_grpc.DistributionServiceStub(channel)
        request = devices_pb2.GetPayloadRequest(device_id=device_id, release=release)
        return b"".join(r.chunk for r in stub.GetPayload(request, timeout=60))


def test_build_server_signs_for_its_product_only(scoped_server: RunningKms) -> None:
    image = build_app_image(CHIP, 20_000, seed=1)
    with scoped_server.client("build-server") as kms:
        assert kms.sign_image(A, image).release.product == A
        with pytest.raises(PermissionDeniedError, match="product 'p-b'"):
            kms.sign_image(B, image)
        digest = hashlib.sha256(b"artifact").digest()
        assert kms.sign_digest(f"keys/{A}-sbv2", digest).signature
        with pytest.raises(PermissionDeniedError, match="product 'p-b'"):
            kms.sign_digest(f"keys/{B}-sbv2", digest)


def test_distribution_server_fetches_payloads_of_its_product_only(scoped_server: RunningKms) -> None:
    with scoped_server.client("build-server") as kms:
        release = kms.sign_image(A, build_app_image(CHIP, 30_000, seed=2)).release.name
    assert _payload(scoped_server, _register(scoped_server, A), release)
    other = _register(scoped_server, B)
    with pytest.raises(grpc.RpcError) as error:
        _payload(scoped_server, other, release)
    _denied(error, B)
    with pytest.raises(grpc.RpcError) as error:  # refused before the release is even looked up
        _payload(scoped_server, other, "releases/" + "00" * 32)
    _denied(error, B)


def test_security_officer_revokes_and_reads_devices_of_its_product_only(scoped_server: RunningKms) -> None:
    mine, theirs = _register(scoped_server, A), _register(scoped_server, B)
    with _channel(scoped_server, "security-officer") as channel:
        stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.RevokeDevice(devices_pb2.RevokeDeviceRequest(device_id=theirs), timeout=30)
        _denied(error, B)
        with pytest.raises(grpc.RpcError) as error:
            stub.GetDevice(devices_pb2.GetDeviceRequest(device_id=theirs), timeout=30)
        _denied(error, B)
        assert (
            stub.RevokeDevice(devices_pb2.RevokeDeviceRequest(device_id=mine), timeout=30).state == "revoked"
        )
    with _channel(scoped_server, "auditor") as channel:  # not listed: every product
        stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        assert stub.GetDevice(devices_pb2.GetDeviceRequest(device_id=theirs), timeout=30).state == "active"


def test_list_keys_shows_the_callers_products_only(scoped_server: RunningKms) -> None:
    def products(role: str) -> set[str]:
        with _channel(scoped_server, role) as channel:
            stub = keys_pb2_grpc.KeyServiceStub(channel)
            return {k.product for k in stub.ListKeys(keys_pb2.ListKeysRequest(), timeout=30).keys}

    assert products("build-server") == {A}
    assert {A, B} <= products("auditor")  # and the service's own keys (product "kms")


def test_registrar_scope_follows_the_policy_default(scoped_server: RunningKms) -> None:
    with _channel(scoped_server, "factory-registrar") as channel:
        stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        for product in (A, B):
            request = devices_pb2.GetRegistrationKeyRequest(product=product)
            assert stub.GetRegistrationKey(request, timeout=30).key_version
