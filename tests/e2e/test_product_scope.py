"""Product scope against a real server whose configuration names a policy file (``[policy] file``).

The development build server and distribution server are scoped to product ``p-a``, the development
security officer too; the other identities (the auditor, the registrar, and the officers alice, bob and
carol) are not listed and keep every product (``default = "all"``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from kmsapi.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    approvals_pb2,
    approvals_pb2_grpc,
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    kek_pb2,
    kek_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
)
from kmsctl import PermissionDeniedError
from tests.support.esp_images import build_app_image
from tests.support.kms_server import KeySpec, RunningKms, init_state, running_kms
from tests.support.officers import issue_officers, officer_channel

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
    issue_officers(state)
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


def _refused(call: Callable[[], object], product: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call()
    _denied(error, product)


def test_an_officer_administers_the_keys_of_its_product_only(scoped_server: RunningKms) -> None:
    with _channel(scoped_server, "security-officer") as channel:
        admin = admin_pb2_grpc.KeyAdminServiceStub(channel)
        theirs, mine = f"keys/{B}-sbv2", f"keys/{A}-sbv2"
        for call in (
            lambda: admin.RotateKey(admin_pb2.RotateKeyRequest(name=theirs), timeout=30),
            lambda: admin.UpdateKeyVersionState(
                admin_pb2.UpdateKeyVersionStateRequest(
                    name=f"{theirs}/versions/1", state=common_pb2.DISABLED
                ),
                timeout=30,
            ),
            lambda: admin.SetRotationSchedule(
                admin_pb2.SetRotationScheduleRequest(name=theirs, period_seconds=86400 * 90), timeout=30
            ),
            lambda: admin.ListKeyTransitions(admin_pb2.ListKeyTransitionsRequest(name=theirs), timeout=30),
            lambda: admin.CreateKey(
                admin_pb2.CreateKeyRequest(
                    key_id=f"{B}-extra", product=B, purpose=common_pb2.DIGEST_SIGNING, algorithm="ecdsa-p256"
                ),
                timeout=30,
            ),
        ):
            _refused(call, B)
        # The same calls on its own product's key pass the scope check (these change nothing).
        request = admin_pb2.UpdateKeyVersionStateRequest(name=f"{mine}/versions/1", state=common_pb2.ENABLED)
        assert admin.UpdateKeyVersionState(request, timeout=30).key.name == mine
        admin.ListKeyTransitions(admin_pb2.ListKeyTransitionsRequest(name=mine), timeout=30)  # not refused
    # B's key is as it was: the auditor (every product) sees version 1 still enabled, no version 2.
    with _channel(scoped_server, "auditor") as channel:
        listed = keys_pb2_grpc.KeyServiceStub(channel).ListKeys(keys_pb2.ListKeysRequest(), timeout=30).keys
    (their_key,) = [k for k in listed if k.name == theirs]
    assert [(v.name, v.state) for v in their_key.versions] == [(f"{theirs}/versions/1", common_pb2.ENABLED)]


def test_an_officer_rotates_the_kek_of_its_product_only(scoped_server: RunningKms) -> None:
    with _channel(scoped_server, "security-officer") as channel:
        kek = kek_pb2_grpc.KekRotationServiceStub(channel)
        _refused(lambda: kek.StartKekRotation(kek_pb2.StartKekRotationRequest(product=B), timeout=30), B)
        _refused(lambda: kek.GetKekRotation(kek_pb2.GetKekRotationRequest(product=B), timeout=30), B)
        with pytest.raises(grpc.RpcError) as error:  # past the scope check: A's KEK was never rotated
            kek.GetKekRotation(kek_pb2.GetKekRotationRequest(product=A), timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_officer_sees_and_votes_on_the_approval_requests_of_its_product_only(
    scoped_server: RunningKms,
) -> None:
    def destruction(version: str) -> approvals_pb2.RequestKeyVersionDestructionRequest:
        return approvals_pb2.RequestKeyVersionDestructionRequest(name=version)

    with (
        officer_channel(scoped_server, "security-officer-alice") as a,
        officer_channel(scoped_server, "security-officer-bob") as b,
        _channel(scoped_server, "security-officer") as d,
    ):
        alice, bob, dev = (approvals_pb2_grpc.ApprovalServiceStub(c) for c in (a, b, d))
        theirs = alice.RequestKeyVersionDestruction(destruction(f"keys/{B}-sbv2/versions/1"), timeout=30)
        mine = alice.RequestKeyVersionDestruction(destruction(f"keys/{A}-sbv2/versions/1"), timeout=30)
        assert (theirs.parameters["product"], mine.parameters["product"]) == (B, A)
        try:
            listed = dev.ListApprovalRequests(
                approvals_pb2.ListApprovalRequestsRequest(), timeout=30
            ).requests
            assert mine.id in {r.id for r in listed} and theirs.id not in {r.id for r in listed}
            assert {r.parameters["product"] for r in listed} == {A}
            _refused(
                lambda: dev.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=theirs.id), timeout=30), B
            )
            _refused(
                lambda: dev.RejectRequest(
                    approvals_pb2.RejectRequestRequest(id=theirs.id, reason="no"), timeout=30
                ),
                B,
            )
            _refused(
                lambda: dev.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=theirs.id), timeout=30), B
            )
            _refused(
                lambda: dev.RequestKeyVersionDestruction(
                    destruction(f"keys/{B}-sbv2/versions/2"), timeout=30
                ),
                B,
            )
            approved = dev.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=mine.id), timeout=30)
            assert [v.officer for v in approved.approvals] == ["spiffe://kms.dev/security-officer/dev"]
            everything = bob.ListApprovalRequests(approvals_pb2.ListApprovalRequestsRequest(), timeout=30)
            unchanged = {r.id: r for r in everything.requests}[theirs.id]
            assert (list(unchanged.approvals), list(unchanged.rejections)) == ([], [])
        finally:  # nothing of this test may ever be executed
            for request in (theirs, mine):
                bob.RejectRequest(
                    approvals_pb2.RejectRequestRequest(id=request.id, reason="test"), timeout=30
                )
