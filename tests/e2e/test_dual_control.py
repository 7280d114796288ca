"""Dual control of key version destruction against the real server (SoftHSM2, SQLite, gRPC over mTLS).

The dev PKI has one officer certificate; the tests issue more with the dev CA (``tests.support.officers``):
alice, bob and carol, each a distinct ``spiffe://kms.dev/security-officer/NAME`` identity.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from kms.server.auth import METHOD_ROLES
from kmsapi.v1 import admin_pb2, admin_pb2_grpc, approvals_pb2, approvals_pb2_grpc, common_pb2
from tests.support.kms_server import KeySpec, RunningKms, init_state, running_kms
from tests.support.officers import OFFICERS, issue_officers, officer_channel

pytestmark = pytest.mark.skipif(
    "/kmsapi.v1.ApprovalService/ExecuteRequest" not in METHOD_ROLES,
    reason="ApprovalService is not wired into the server yet",
)


@pytest.fixture(scope="module")
def officers(kms_server: RunningKms) -> Iterator[dict[str, approvals_pb2_grpc.ApprovalServiceStub]]:
    issue_officers(kms_server.state_dir)
    channels = {name: officer_channel(kms_server, f"security-officer-{name}") for name in OFFICERS}
    yield {name: approvals_pb2_grpc.ApprovalServiceStub(c) for name, c in channels.items()}
    for c in channels.values():
        c.close()


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    error = raised.value
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


def _create_key(server: RunningKms, key_id: str) -> None:
    with officer_channel(server, "security-officer") as channel:
        admin_pb2_grpc.KeyAdminServiceStub(channel).CreateKey(
            admin_pb2.CreateKeyRequest(
                key_id=key_id,
                product="dual-control",
                purpose=common_pb2.DIGEST_SIGNING,
                algorithm="ecdsa-p256",
            ),
            timeout=30,
        )


def test_m_distinct_other_officers_approve_then_execute(
    kms_server: RunningKms, officers: dict[str, approvals_pb2_grpc.ApprovalServiceStub]
) -> None:
    _create_key(kms_server, "dual-a")
    with officer_channel(kms_server, "security-officer") as channel:
        rotated = admin_pb2_grpc.KeyAdminServiceStub(channel).RotateKey(
            admin_pb2.RotateKeyRequest(name="keys/dual-a"), timeout=30
        )
    assert rotated.key_version.name == "keys/dual-a/versions/2"
    alice, bob, carol = officers["alice"], officers["bob"], officers["carol"]
    version = "keys/dual-a/versions/1"

    made = alice.RequestKeyVersionDestruction(
        approvals_pb2.RequestKeyVersionDestructionRequest(name=version, delay_seconds=7200), timeout=10
    )
    assert made.state == approvals_pb2.APPROVAL_STATE_PENDING and made.required_approvals == 2
    assert made.requester == "spiffe://kms.dev/security-officer/alice"
    assert made.target == version
    assert dict(made.parameters) == {"delay_seconds": "7200", "product": "dual-control"}

    code, details = _code(lambda: alice.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "cannot vote" in details

    once = bob.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id), timeout=10)
    assert once.state == approvals_pb2.APPROVAL_STATE_PENDING and len(once.approvals) == 1
    code, details = _code(lambda: bob.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "voted" in details
    code, details = _code(lambda: bob.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=made.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "1 more approval" in details

    twice = carol.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id), timeout=10)
    assert twice.state == approvals_pb2.APPROVAL_STATE_APPROVED
    assert [v.officer.rsplit("/", 1)[1] for v in twice.approvals] == ["bob", "carol"]

    done = alice.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=made.id), timeout=30)
    assert done.request.state == approvals_pb2.APPROVAL_STATE_EXECUTED
    assert done.request.executed_by == "spiffe://kms.dev/security-officer/alice"
    assert [s.key_version for s in done.key.scheduled_destructions] == [version]
    delay = done.key.scheduled_destructions[0].destroy_time.seconds - done.request.execute_time.seconds
    assert 7190 <= delay <= 7210
    code, details = _code(lambda: bob.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=made.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "executed" in details

    with officer_channel(kms_server, "security-officer") as channel:
        history = admin_pb2_grpc.KeyAdminServiceStub(channel).ListKeyTransitions(
            admin_pb2.ListKeyTransitionsRequest(name="keys/dual-a"), timeout=10
        )
    last = history.transitions[-1]
    assert (last.key_version, last.event) == (version, admin_pb2.KEY_TRANSITION_DESTROY_SCHEDULED)
    assert last.actor == "spiffe://kms.dev/security-officer/alice"
    with officer_channel(kms_server, "security-officer") as channel:  # cancelling restores: no dual control
        cancelled = admin_pb2_grpc.KeyAdminServiceStub(channel).CancelKeyVersionDestruction(
            admin_pb2.CancelKeyVersionDestructionRequest(name=version), timeout=10
        )
    assert not cancelled.scheduled_destructions

    listed = carol.ListApprovalRequests(
        approvals_pb2.ListApprovalRequestsRequest(state=approvals_pb2.APPROVAL_STATE_EXECUTED), timeout=10
    )
    assert made.id in [r.id for r in listed.requests]


def test_a_rejected_request_cannot_be_executed(
    kms_server: RunningKms, officers: dict[str, approvals_pb2_grpc.ApprovalServiceStub]
) -> None:
    _create_key(kms_server, "dual-b")
    made = officers["alice"].RequestKeyVersionDestruction(
        approvals_pb2.RequestKeyVersionDestructionRequest(name="keys/dual-b/versions/1"), timeout=10
    )
    officers["bob"].ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id), timeout=10)
    rejected = officers["carol"].RejectRequest(
        approvals_pb2.RejectRequestRequest(id=made.id, reason="still in use"), timeout=10
    )
    assert rejected.state == approvals_pb2.APPROVAL_STATE_REJECTED
    assert rejected.rejections[0].reason == "still in use"
    code, _ = _code(lambda: officers["alice"].ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=made.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_unknown_versions_are_refused_up_front(
    officers: dict[str, approvals_pb2_grpc.ApprovalServiceStub],
) -> None:
    code, _ = _code(
        lambda: officers["alice"].RequestKeyVersionDestruction(
            approvals_pb2.RequestKeyVersionDestructionRequest(name="keys/artifacts-p256/versions/9")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_direct_scheduling_is_refused(kms_server: RunningKms) -> None:
    with officer_channel(kms_server, "security-officer") as channel:
        stub = admin_pb2_grpc.KeyAdminServiceStub(channel)
        code, details = _code(
            lambda: stub.ScheduleKeyVersionDestruction(
                admin_pb2.ScheduleKeyVersionDestructionRequest(name="keys/artifacts-p256/versions/1")
            )
        )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs dual control" in details and "kmsctl approvals request-destroy VERSION" in details


def test_other_roles_are_refused(kms_server: RunningKms) -> None:
    with officer_channel(kms_server, "auditor") as channel:
        stub = approvals_pb2_grpc.ApprovalServiceStub(channel)
        code, _ = _code(lambda: stub.ListApprovalRequests(approvals_pb2.ListApprovalRequestsRequest()))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_kmsctl_approvals(kms_server: RunningKms, officers: object) -> None:
    _create_key(kms_server, "dual-cli")
    with officer_channel(kms_server, "security-officer") as channel:
        admin_pb2_grpc.KeyAdminServiceStub(channel).RotateKey(
            admin_pb2.RotateKeyRequest(name="keys/dual-cli"), timeout=30
        )
    asked = kms_server.kmsctl(
        "approvals",
        "request-destroy",
        "dual-cli/versions/1",
        "--delay",
        "1h",
        "--json",
        role="security-officer-alice",
    )
    assert asked.returncode == 0, asked.stderr
    request_id = json.loads(asked.stdout)["id"]
    assert json.loads(asked.stdout)["parameters"]["delay_seconds"] == "3600"
    own = kms_server.kmsctl("approvals", "approve", request_id, role="security-officer-alice")
    assert own.returncode != 0 and "cannot vote" in own.stderr
    for name in ("bob", "carol"):
        voted = kms_server.kmsctl("approvals", "approve", request_id, role=f"security-officer-{name}")
        assert voted.returncode == 0, voted.stderr
    listed = kms_server.kmsctl("approvals", "list", "--state", "approved", "--json")
    assert listed.returncode == 0, listed.stderr
    assert request_id in [r["id"] for r in json.loads(listed.stdout)["requests"]]
    executed = kms_server.kmsctl("approvals", "execute", request_id, "--json")
    assert executed.returncode == 0, executed.stderr
    data = json.loads(executed.stdout)
    assert data["request"]["state"] == "executed"
    assert list(data["scheduled_destructions"]) == ["keys/dual-cli/versions/1"]

    exported = kms_server.state_dir / f"audit-{request_id}.jsonl"
    assert kms_server.kmsctl("audit", "export", "-o", str(exported)).returncode == 0
    records = [json.loads(line) for line in exported.read_text().splitlines() if line.strip()]
    service = "/kmsapi.v1.ApprovalService/"
    trail = [
        (r["caller"].rsplit("/", 1)[1], r["operation"].removeprefix(service), r["outcome"])
        for r in records
        if r.get("resource") == f"approvals/{request_id}"
    ]
    assert trail == [
        ("alice", "RequestKeyVersionDestruction", "OK"),
        ("alice", "ApproveRequest", "PERMISSION_DENIED"),
        ("bob", "ApproveRequest", "OK"),
        ("carol", "ApproveRequest", "OK"),
        ("dev", "ExecuteRequest", "OK"),
    ]
    assert all(
        r["key_version"] == "keys/dual-cli/versions/1"
        for r in records
        if r.get("resource") == f"approvals/{request_id}" and r["operation"] != service + "ApproveRequest"
    )


@pytest.fixture(scope="module")
def short_ttl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    state = tmp_path_factory.mktemp("kms-short-ttl")
    keys = [KeySpec("ttl-key", "ttl", "ecdsa-p256", None, "digest-signing")]
    init_state(state, keys)
    with (state / "kms.toml").open("a") as config:
        config.write("\n[dual_control]\nrequired_approvals = 1\nttl_seconds = 2\n")
    issue_officers(state)
    with running_kms(state, keys, init=False) as server:
        yield server


def test_an_expired_request_is_refused(short_ttl_server: RunningKms) -> None:
    import time

    with (
        officer_channel(short_ttl_server, "security-officer-alice") as a,
        officer_channel(short_ttl_server, "security-officer-bob") as b,
    ):
        alice, bob = approvals_pb2_grpc.ApprovalServiceStub(a), approvals_pb2_grpc.ApprovalServiceStub(b)
        ask = approvals_pb2.RequestKeyVersionDestructionRequest(name="keys/ttl-key/versions/1")
        first = alice.RequestKeyVersionDestruction(ask, timeout=10)
        assert first.required_approvals == 1
        code, details = _code(lambda: bob.RequestKeyVersionDestruction(ask))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and f"{first.id} " in details  # one open request
        approved = bob.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=first.id), timeout=10)
        assert approved.state == approvals_pb2.APPROVAL_STATE_APPROVED
        time.sleep(2.5)
        code, details = _code(lambda: bob.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=first.id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in details
        code, details = _code(lambda: alice.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=first.id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in details
        listed = bob.ListApprovalRequests(
            approvals_pb2.ListApprovalRequestsRequest(state=approvals_pb2.APPROVAL_STATE_EXPIRED), timeout=10
        )
        assert {r.id for r in listed.requests} == {first.id}
        second = alice.RequestKeyVersionDestruction(ask, timeout=10)  # the expired one no longer blocks
        assert second.id != first.id and second.state == approvals_pb2.APPROVAL_STATE_PENDING
