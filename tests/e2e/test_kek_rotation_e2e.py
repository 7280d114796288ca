"""KEK rotation against a real server (``kmsctl kek``, ``KekRotationService``): every payload is byte for byte
the same after the rewrap (the payload key is an HMAC keyed by the device secret, and the manifest signature
is stored), so no device lost its secret; the old KEK version may be destroyed afterwards, the new one not.
Skipped until the server serves ``KekRotationService`` (``kms.server.auth.METHOD_ROLES``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest

from kms.server.auth import METHOD_ROLES
from kmsapi.v1 import approvals_pb2, approvals_pb2_grpc, kek_pb2, kek_pb2_grpc
from tests.e2e.conftest import KEYS
from tests.e2e.test_devices_and_payloads import _channel, _device, _payload, _register, _release, _row
from tests.support.kms_server import running_kms
from tests.support.officers import approved_destruction

pytestmark = pytest.mark.skipif(
    "/kmsapi.v1.KekRotationService/StartKekRotation" not in METHOD_ROLES,
    reason="KekRotationService is not wired into the server yet",
)


def test_rotation_over_grpc_keeps_every_payload(tmp_path: Path) -> None:
    with running_kms(tmp_path / "state", KEYS, product_sets=["fleet"]) as server:
        secrets = {f"24:6f:28:10:{n // 256:02x}:{n % 256:02x}": os.urandom(32) for n in range(300)}
        outcomes = _register(server, [_row(i, d, s) for i, (d, s) in enumerate(secrets.items())])
        assert len(outcomes) == 300
        release, _image = _release(server, secure_version=5, seed=21)
        sample = list(secrets)[::25]
        before = {d: _payload(server, d, release)[1] for d in sample}

        with _channel(server, "distribution-server") as channel:
            stub = kek_pb2_grpc.KekRotationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetKekRotation(kek_pb2.GetKekRotationRequest(product="fleet"), timeout=30)
            assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED

        done = server.kmsctl("kek", "rotate", "--product", "fleet", "--wait", "--interval", "0.1", "--json")
        assert done.returncode == 0, done.stderr
        job = json.loads(done.stdout)
        assert job["finished"] and job["rewrapped"] == 300 and job["remaining"] == 0
        assert job["to_version"] == "keys/fleet-kek/versions/2"

        assert {d: _payload(server, d, release)[1] for d in sample} == before
        for device_id in sample[:3]:
            model = _device(server, device_id, secrets[device_id])
            assert model.apply_update(before[device_id]).verdict.name == "OK"

        # Destruction is under dual control: requested by one officer, approved by two others.
        kek_v1, kek_v2 = "keys/fleet-kek/versions/1", "keys/fleet-kek/versions/2"
        guarded_id = approved_destruction(server, kek_v2, new_primary_version=kek_v1)
        with _channel(server, "security-officer") as channel:
            approvals = approvals_pb2_grpc.ApprovalServiceStub(channel)
            with pytest.raises(grpc.RpcError) as guarded:
                approvals.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=guarded_id), timeout=30)
            assert guarded.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "300 device secrets" in (guarded.value.details() or "")
            done_id = approved_destruction(server, kek_v1)
            approvals.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=done_id), timeout=30)

    with running_kms(tmp_path / "state", init=False) as again:  # the job survives a restart
        status = again.kmsctl("kek", "status", "--product", "fleet", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["rewrapped"] == 300
