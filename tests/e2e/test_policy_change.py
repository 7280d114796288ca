"""Changing the authorization policy under dual control, against two real server processes sharing one
database (SoftHSM2, SQLite, gRPC over mTLS), and ``kmsctl policy`` as a subprocess.

The servers start without a ``[policy]`` file: every identity acts for every product. Officers alice, bob and
carol (``tests.support.officers``) request, approve and execute a policy that scopes the development build
server to product ``pol-a``; both processes must refuse it product ``pol-b`` within about a second, without
a restart.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from kmsapi.v1 import approvals_pb2, approvals_pb2_grpc, policy_pb2, policy_pb2_grpc
from kmsctl import PermissionDeniedError
from tests.support.kms_server import KeySpec, RunningKms, init_state, running_kms
from tests.support.officers import issue_officers, officer_channel

A, B = "pol-a", "pol-b"
KEYS = [KeySpec(f"{p}-artifacts", p, "ecdsa-p256", None, "digest-signing") for p in (A, B)]
ALICE = "spiffe://kms.dev/security-officer/alice"
SCOPED = f"""default = "all"

[identities]
"spiffe://kms.dev/build-server/dev" = ["{A}"]
"spiffe://kms.dev/security-officer/*" = "*"
"""
DIGEST = hashlib.sha256(b"artifact").digest()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningKms, RunningKms]]:
    """Two server processes on one state directory (one database, one token)."""
    state: Path = tmp_path_factory.mktemp("kms-policy")
    init_state(state, KEYS)
    issue_officers(state)
    with running_kms(state, KEYS, init=False) as first, running_kms(state, KEYS, init=False) as second:
        yield first, second


@contextmanager
def _officers(server: RunningKms, *names: str) -> Iterator[list[approvals_pb2_grpc.ApprovalServiceStub]]:
    """ApprovalService stubs, one per officer NAME (``security-officer-NAME`` certificates)."""
    with ExitStack() as stack:
        channels = [stack.enter_context(officer_channel(server, f"security-officer-{n}")) for n in names]
        yield [approvals_pb2_grpc.ApprovalServiceStub(channel) for channel in channels]


def _policy(server: RunningKms, identity: str = "auditor") -> policy_pb2.AuthorizationPolicy:
    with officer_channel(server, identity) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        return stub.GetAuthorizationPolicy(policy_pb2.GetAuthorizationPolicyRequest(), timeout=30)


def _signs(server: RunningKms, product: str) -> bool:
    """Whether the development build server may sign with ``product``'s key on ``server``."""
    with server.client("build-server") as kms:
        try:
            kms.sign_digest(f"keys/{product}-artifacts", DIGEST)
        except PermissionDeniedError as error:
            assert f"product {product!r}" in str(error)
            return False
    return True


def _propose(stub: approvals_pb2_grpc.ApprovalServiceStub, text: str) -> approvals_pb2.ApprovalRequest:
    request = approvals_pb2.RequestPolicyChangeRequest(policy_toml=text)
    response: approvals_pb2.ApprovalRequest = stub.RequestPolicyChange(request, timeout=30)
    return response


def _refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details() or ""


def test_a_policy_change_applies_in_every_process_within_a_second(
    servers: tuple[RunningKms, RunningKms],
) -> None:
    first, second = servers
    before = _policy(first)
    assert (before.version, before.toml) == (0, "")  # no [policy] file: nobody is scoped
    assert all(_signs(server, product) for server in servers for product in (A, B))
    with _officers(first, "alice", "bob", "carol") as (alice, bob, carol):
        request = _propose(alice, SCOPED)
        assert request.action == approvals_pb2.APPROVAL_ACTION_CHANGE_AUTHORIZATION_POLICY
        assert dict(request.parameters) == {
            "product": "kms",
            "policy_sha256": hashlib.sha256(SCOPED.encode()).hexdigest(),
            "base_version": "0",
            "base_sha256": hashlib.sha256(b"").hexdigest(),
        }
        rival = _propose(bob, SCOPED + "# a rival change of version 0\n")
        code, details = _refusal(
            lambda: alice.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=request.id))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "cannot vote" in details
        for officer in (bob, carol):
            officer.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=request.id), timeout=30)
        for officer in (alice, carol):
            officer.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=rival.id), timeout=30)

        executed = alice.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=request.id), timeout=30)
        applied_from = time.monotonic()
        assert (executed.policy.version, executed.policy.toml) == (1, SCOPED)
        assert executed.request.state == approvals_pb2.APPROVAL_STATE_EXECUTED

        pending = {first.port, second.port}
        while pending and time.monotonic() - applied_from < 5:
            pending = {s.port for s in servers if s.port in pending and _signs(s, B)}
            time.sleep(0.05)
        elapsed = time.monotonic() - applied_from
        assert not pending, (
            f"a server still lets the build server sign for {B} {elapsed:.1f} s after the change"
        )
        assert elapsed < 2.5, f"the change took {elapsed:.1f} s to apply everywhere"
        assert all(_signs(server, A) for server in servers)
        assert not any(_signs(server, B) for server in servers)

        for server in servers:  # the auditor (not named: every product) reads it from either process
            policy = _policy(server)
            assert (policy.version, policy.toml, policy.updated_by) == (1, SCOPED, ALICE)
            assert policy.update_request == f"approvals/{request.id}"
            assert policy.sha256 == hashlib.sha256(SCOPED.encode()).digest()
            assert policy.HasField("update_time")

        # The rival was approved against version 0, which is no longer in force.
        code, details = _refusal(lambda: bob.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=rival.id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "changed since the request" in details
        assert _policy(second).version == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('default = "all"\n[identities\n', "is not valid TOML"),
        ('default = "all"\n[identities]\n"spiffe://kms.dev/build-server/dev" = "pol-a"\n', "list of product"),
        ('default = "none"\n[identities]\n"spiffe://kms.dev/security-officer/*" = ["pol-a"]\n', "lock the"),
        ('default = "none"\n', "lock the security officers out"),
        ('default = "all"\n' + "#" * (64 * 1024), "at most 64 KiB"),
    ],
)
def test_a_bad_policy_is_refused_when_requested(
    servers: tuple[RunningKms, RunningKms], text: str, message: str
) -> None:
    with _officers(servers[0], "alice") as (alice,):
        code, details = _refusal(lambda: _propose(alice, text))
        listed = alice.ListApprovalRequests(approvals_pb2.ListApprovalRequestsRequest(), timeout=30).requests
    assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details
    assert all(r.parameters.get("policy_sha256") != hashlib.sha256(text.encode()).hexdigest() for r in listed)


def test_kmsctl_policy_show_and_propose(servers: tuple[RunningKms, RunningKms], tmp_path: Path) -> None:
    server = servers[0]
    shown = server.kmsctl("policy", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    in_force = _policy(server, "security-officer")
    assert data["version"] == in_force.version and data["toml"] == in_force.toml
    assert data["sha256"] == in_force.sha256.hex()
    assert data["updated_by"] == (in_force.updated_by or None)
    text = server.kmsctl("policy", "show", "--quiet", role="auditor")
    assert text.returncode == 0, text.stderr
    assert text.stdout.rstrip("\n") == in_force.toml.rstrip("\n")  # exactly the text, ready to edit

    proposal = tmp_path / "policy.toml"
    proposal.write_text(SCOPED + '"spiffe://kms.dev/distribution-server/*" = ["pol-a"]\n', encoding="utf-8")
    made = server.kmsctl("policy", "propose", str(proposal), "--json", role="security-officer-alice")
    assert made.returncode == 0, made.stderr
    request = json.loads(made.stdout)
    digest = hashlib.sha256(proposal.read_bytes()).hexdigest()
    assert request["action"] == "change-authorization-policy" and request["state"] == "pending"
    assert request["requester"] == ALICE and request["policy_sha256"] == digest
    assert request["parameters"]["policy_sha256"] == digest and request["parameters"]["product"] == "kms"
    try:
        listed = server.kmsctl("approvals", "list", "--json", role="security-officer-bob")
        assert request["id"] in {r["id"] for r in json.loads(listed.stdout)["requests"]}
        people = server.kmsctl("policy", "propose", str(proposal), role="security-officer-carol")
        assert people.returncode == 0, people.stderr
        assert digest in people.stdout and "kmsctl approvals approve" in people.stdout
    finally:  # none of these requests may ever be executed
        pending = server.kmsctl(
            "approvals", "list", "--state", "pending", "--json", role="security-officer-bob"
        )
        for made_here in json.loads(pending.stdout)["requests"]:
            if made_here["parameters"].get("policy_sha256") == digest:
                server.kmsctl(
                    "approvals", "reject", made_here["id"], "--reason", "test", role="security-officer-bob"
                )

    bad = tmp_path / "bad.toml"
    bad.write_text("default = ", encoding="utf-8")
    refused = server.kmsctl("policy", "propose", str(bad), role="security-officer-alice")
    assert refused.returncode != 0 and "not valid TOML" in refused.stderr
    assert _policy(server).version == in_force.version  # nothing was installed
