"""Changing the authorization policy under dual control, against two real server processes sharing one
database (SoftHSM2, SQLite, gRPC over mTLS), and ``kmsctl policy`` as a subprocess.

The servers start without a ``[policy]`` file: every identity acts for every product. Officers alice, bob and
carol (``tests.support.officers``) request, approve and execute a policy that scopes the development build
server to product ``pol-a``; both processes must refuse it product ``pol-b`` within about a second, without
a restart. Last, ``kms policy reset`` (break glass, a subprocess on the same database) installs "no policy"
and then a ``[policy]`` file, and both processes apply each within about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from kms.store.database import Database
from kmsapi.v1 import approvals_pb2, approvals_pb2_grpc, policy_pb2, policy_pb2_grpc
from kmsctl import PermissionDeniedError
from tests.support.kms_server import KMS, KeySpec, RunningKms, init_state, run_kms, running_kms
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


def _policy(
    server: RunningKms, identity: str = "auditor", *, draft_sha256: bytes = b""
) -> policy_pb2.AuthorizationPolicy:
    """The policy in force, or with ``draft_sha256`` the one proposed under that SHA-256."""
    with officer_channel(server, identity) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        request = policy_pb2.GetAuthorizationPolicyRequest(draft_sha256=draft_sha256)
        return stub.GetAuthorizationPolicy(request, timeout=30)


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


def _applied_everywhere(servers: tuple[RunningKms, RunningKms], signs_b: bool) -> float:
    """Seconds until both servers let the build server sign for ``B`` (or refuse it), at most 5."""
    start = time.monotonic()
    pending = {server.port for server in servers}
    while pending and time.monotonic() - start < 5:
        pending = {s.port for s in servers if s.port in pending and _signs(s, B) != signs_b}
        time.sleep(0.05)
    assert not pending, f"a server does not apply the change {time.monotonic() - start:.1f} s after it"
    return time.monotonic() - start


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
        # Before voting, another officer reads what the request installs, by the hash it names, from
        # either process.
        named = bytes.fromhex(request.parameters["policy_sha256"])
        for server in servers:
            draft = _policy(server, "security-officer-bob", draft_sha256=named)
            assert (draft.draft, draft.toml, draft.sha256, draft.version) == (True, SCOPED, named, 0)
            assert not draft.updated_by and not draft.HasField("update_time")
        code, details = _refusal(lambda: _propose(bob, SCOPED + "# a rival change of version 0\n"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "pending already" in details  # one at a time
        code, details = _refusal(
            lambda: alice.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=request.id))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "cannot vote" in details
        for officer in (bob, carol):
            officer.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=request.id), timeout=30)

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


@pytest.mark.parametrize(
    ("draft_sha256", "status", "message"),
    [
        (hashlib.sha256(b"never proposed").digest(), grpc.StatusCode.NOT_FOUND, "no proposed policy"),
        (hashlib.sha256(SCOPED.encode()).digest()[:31], grpc.StatusCode.INVALID_ARGUMENT, "32 bytes, not 31"),
        (hashlib.sha512(SCOPED.encode()).digest(), grpc.StatusCode.INVALID_ARGUMENT, "32 bytes, not 64"),
    ],
    ids=["unknown", "short", "sha512"],
)
def test_a_draft_is_read_only_by_its_exact_sha256(
    servers: tuple[RunningKms, RunningKms], draft_sha256: bytes, status: grpc.StatusCode, message: str
) -> None:
    code, details = _refusal(lambda: _policy(servers[0], "security-officer-bob", draft_sha256=draft_sha256))
    assert code == status and message in details


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
        read_it = f"kmsctl policy show --draft {digest}"
        listed = server.kmsctl("approvals", "list", role="security-officer-bob")
        assert (
            f"{request['id']} pending:" in listed.stdout and f"  proposed policy: {read_it}" in listed.stdout
        )
        draft = server.kmsctl("policy", "show", "--draft", digest, "--quiet", role="security-officer-bob")
        assert draft.returncode == 0, draft.stderr
        assert draft.stdout == proposal.read_text(encoding="utf-8")  # exactly the file alice proposed
        as_json = server.kmsctl("policy", "show", "--draft", digest, "--json", role="auditor")
        assert json.loads(as_json.stdout) == {"draft": True, "toml": draft.stdout, "sha256": digest}
        malformed = server.kmsctl("policy", "show", "--draft", digest[:-2], role="security-officer-bob")
        assert malformed.returncode == 3 and "--draft expects 64 hex digits" in malformed.stderr

        # One open policy change at a time: carol's proposal waits until alice withdraws hers.
        again = server.kmsctl("policy", "propose", str(proposal), role="security-officer-carol")
        assert again.returncode == 5 and "pending already" in again.stderr
        withdrawn = server.kmsctl(
            "approvals", "reject", request["id"], "--reason", "carol's", role="security-officer-alice"
        )
        assert withdrawn.returncode == 0, withdrawn.stderr
        people = server.kmsctl("policy", "propose", str(proposal), role="security-officer-carol")
        assert people.returncode == 0, people.stderr
        assert digest in people.stdout and "kmsctl approvals approve" in people.stdout
        assert read_it in people.stdout
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


def test_kms_policy_reset_breaks_glass_on_the_server_host(servers: tuple[RunningKms, RunningKms]) -> None:
    first, second = servers
    before = _policy(first).version
    operator = f"local:{pwd.getpwuid(os.getuid()).pw_name}"
    with _officers(first, "alice", "bob", "carol") as (alice, bob, carol):  # approved, not yet executed
        approved = _propose(alice, SCOPED + "# approved before the reset\n")
        for officer in (bob, carol):
            officer.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=approved.id), timeout=30)

        reset = run_kms("policy", "reset", "--config", str(first.config), "--reason", "officers locked out")
        assert f"installed authorization policy version {before + 1}: no policy" in reset.stdout
        assert _applied_everywhere(servers, signs_b=True) < 2.5
        # The approvers judged a change of the version the reset replaced: it is no longer executable.
        code, details = _refusal(
            lambda: alice.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=approved.id))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "changed since the request" in details
    for server in servers:
        policy = _policy(server)
        assert (policy.version, policy.updated_by, policy.update_request) == (
            before + 1,
            operator,
            "break-glass",
        )
        header, body = policy.toml.split("\n", 1)
        assert header.startswith("# break-glass: installed by 'kms policy reset' (" + operator)
        assert header.endswith(": officers locked out") and body == 'default = "all"\n'
    with Database.open(first.state_dir / "kms.db") as db, db.snapshot() as session:
        audited = session.rows(
            "SELECT caller, product, resource, outcome FROM audit_records WHERE operation = ?",
            ["kms policy reset"],
        )
    assert [
        (r.text("caller"), r.text("product"), r.text("resource"), r.text("outcome")) for r in audited
    ] == [(operator, "kms", "authorization-policy", "OK")]

    # With a [policy] file, that file is what comes back.
    (first.state_dir / "reset-policy.toml").write_text(SCOPED, encoding="utf-8")
    config = first.state_dir / "kms-with-policy.toml"
    config.write_text(
        first.config.read_text(encoding="utf-8") + '\n[policy]\nfile = "reset-policy.toml"\n',
        encoding="utf-8",
    )
    made = json.loads(
        run_kms("policy", "reset", "--config", str(config), "--reason", "restore", "--json").stdout
    )
    assert made["version"] == before + 2 and made["approval_id"] == "break-glass" and made["lockout"] is None
    assert made["policy_file"] == str(first.state_dir / "reset-policy.toml")
    assert _applied_everywhere(servers, signs_b=False) < 2.5
    assert _policy(second).toml.endswith("\n" + SCOPED)

    refused = subprocess.run(
        [*KMS, "policy", "reset", "--config", str(config), "--reason", " "],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 3 and "needs a reason" in refused.stderr
    assert _policy(first).version == before + 2
