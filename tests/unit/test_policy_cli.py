"""``kmsctl policy show --draft`` and how ``kmsctl policy propose`` and ``kmsctl approvals list`` point
approvers to it, against the real ``PolicyServicer`` and ``ApprovalServicer`` (with the ``ChangePolicy`` act)
over mutual TLS, on a real SQLite file; and the client's own check of the text a server returns, against a
server that lies. The same commands against the whole server are in tests/e2e/test_policy_change.py."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import tomllib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from kms.domain.approvals import Action
from kms.server.approval_servicers import add_approvals
from kms.server.pki import create_dev_pki
from kms.server.policy_servicers import ChangePolicy, add_policy
from kms.service.approvals import DualControl
from kms.service.policy import AuthorizationPolicies
from kms.store.approvals import SqliteApprovalRepository
from kms.store.database import Database
from kms.store.policy import SqlitePolicyRepository
from kmsapi.v1 import policy_pb2, policy_pb2_grpc
from kmsctl import cli

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
PROPOSED = """# scope the development build server to one product
default = "all"

[identities]
"spiffe://kms.dev/build-server/dev" = ["thermostat"]
"spiffe://kms.dev/security-officer/*" = "*"
"""
SHA = hashlib.sha256(PROPOSED.encode()).hexdigest()
REQUEST_KEYS = {
    "id",
    "action",
    "target",
    "parameters",
    "requester",
    "create_time",
    "expire_time",
    "required_approvals",
    "approvals",
    "rejections",
    "state",
    "execute_time",
    "executed_by",
}


def _serve(state_dir: Path, *services: Callable[[grpc.Server], None]) -> tuple[grpc.Server, int]:
    """A server of ``services`` (each adds its servicer to the server) over mTLS with the dev PKI."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    for add in services:
        add(server)
    pki = state_dir / "pki"
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


class Served:
    """``PolicyService`` and ``ApprovalService`` as the server wires them, without the HSM parts."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        create_dev_pki(state_dir / "pki")
        self.db = Database.open(state_dir / "kms.db")
        policies = AuthorizationPolicies(SqlitePolicyRepository(self.db), "", clock=lambda: T0)
        dual = DualControl(SqliteApprovalRepository(self.db))
        acts = {Action.CHANGE_AUTHORIZATION_POLICY: ChangePolicy(policies)}
        self.server, self.port = _serve(
            state_dir,
            lambda server: add_policy(server, policies),
            lambda server: add_approvals(server, dual, acts),
        )

    def kmsctl(
        self, *args: str, identity: str = "security-officer", port: int | None = None
    ) -> tuple[int, str, str]:
        """Run kmsctl in this process as ``identity`` against this server (or the server on ``port``, of
        the same PKI): (exit code, stdout, stderr)."""
        server = f"127.0.0.1:{port or self.port}"
        argv = [*args, "--server", server, "--state-dir", str(self.state_dir), "--identity", identity]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
        return code, out.getvalue(), err.getvalue()

    def stop(self) -> None:
        self.server.stop(grace=None).wait()
        self.db.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = Served(tmp_path_factory.mktemp("policy-cli") / ".kms")
    yield running
    running.stop()


@dataclass(frozen=True)
class Proposed:
    """What ``kmsctl policy propose`` printed for ``PROPOSED`` (the request is pending all along)."""

    summary: str
    request: dict[str, Any]


@pytest.fixture(scope="module")
def proposed(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Proposed:
    file = tmp_path_factory.mktemp("proposal") / "policy.toml"
    file.write_text(PROPOSED, encoding="utf-8")
    code, out, err = served.kmsctl("policy", "propose", str(file))
    assert code == 0, err
    code, listed, err = served.kmsctl("approvals", "list", "--json")
    assert code == 0, err
    (request,) = json.loads(listed)["requests"]
    return Proposed(out, request)


def test_propose_names_the_command_that_prints_the_draft(proposed: Proposed) -> None:
    assert proposed.request["parameters"] == {
        "product": "kms",
        "policy_sha256": SHA,
        "base_version": "0",
        "base_sha256": hashlib.sha256(b"").hexdigest(),
    }
    assert f"approval request {proposed.request['id']} created" in proposed.summary
    assert f"approvers read the proposed text with 'kmsctl policy show --draft {SHA}'" in proposed.summary


def test_another_officer_reads_exactly_the_proposed_text(served: Served, proposed: Proposed) -> None:
    code, out, err = served.kmsctl("policy", "show", "--draft", SHA, "--quiet", identity="auditor")
    assert code == 0, err
    assert out == PROPOSED  # byte for byte, ready to diff against the file that was sent

    code, out, err = served.kmsctl("policy", "show", "--draft", SHA.upper(), identity="security-officer-bob")
    assert code == 0, err
    assert out.startswith(PROPOSED) and f"# sha256 {SHA}" in out and "not in force" in out
    assert tomllib.loads(out) == tomllib.loads(PROPOSED)  # the comments keep it a valid policy file

    code, out, err = served.kmsctl("policy", "show", "--draft", SHA, "--json")
    assert code == 0, err
    assert json.loads(out) == {"draft": True, "toml": PROPOSED, "sha256": SHA}


def test_the_policy_in_force_is_unchanged_by_a_proposal(served: Served, proposed: Proposed) -> None:
    code, out, err = served.kmsctl("policy", "show", "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "version": 0,
        "toml": "",
        "sha256": hashlib.sha256(b"").hexdigest(),
        "update_time": None,
        "updated_by": None,
        "update_request": None,
    }


def test_approvals_list_points_to_the_draft(served: Served, proposed: Proposed) -> None:
    code, out, err = served.kmsctl("approvals", "list", identity="security-officer-carol")
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{proposed.request['id']} pending:"))
    assert lines[at + 1] == f"  proposed policy: kmsctl policy show --draft {SHA}"

    code, out, err = served.kmsctl("approvals", "list", "--json", identity="security-officer-carol")
    assert code == 0, err
    listed = json.loads(out)["requests"]
    assert proposed.request["id"] in {r["id"] for r in listed}
    assert all(set(r) == REQUEST_KEYS for r in listed)  # --json is as it was: no hint in it


def test_a_hash_nothing_was_proposed_under_is_not_found(served: Served) -> None:
    unknown = hashlib.sha256(b"never proposed").hexdigest()
    code, _out, err = served.kmsctl("policy", "show", "--draft", unknown)
    assert code == cli.EXIT_NOT_FOUND
    assert f"no proposed policy with SHA-256 {unknown}" in err


@pytest.mark.parametrize(
    "bad",
    [SHA[:-1], SHA + "0", "g" * 64, f"{SHA[:32]} {SHA[33:]}", f"0x{SHA[2:]}", ""],
    ids=["63 digits", "65 digits", "not hex", "a space", "0x prefix", "empty"],
)
def test_a_malformed_hash_is_refused_before_any_call(served: Served, bad: str) -> None:
    code, out, err = served.kmsctl("policy", "show", "--draft", bad)
    assert code == cli.EXIT_INVALID and out == ""
    assert "--draft expects 64 hex digits (the policy_sha256 of a policy change request)" in err
    code, out, _err = served.kmsctl("policy", "show", "--draft", bad, "--json")
    assert code == cli.EXIT_INVALID
    assert json.loads(out)["error"]["code"] == "INVALID_ARGUMENT"


class LyingPolicyService(policy_pb2_grpc.PolicyServiceServicer):
    """Answers every draft with another text than the one proposed (``draft``: whether it says so)."""

    def __init__(self, *, draft: bool) -> None:
        self._draft = draft

    def GetAuthorizationPolicy(  # noqa: N802 - gRPC method name
        self, request: policy_pb2.GetAuthorizationPolicyRequest, context: grpc.ServicerContext
    ) -> policy_pb2.AuthorizationPolicy:
        text = PROPOSED.replace('["thermostat"]', '"*"')
        return policy_pb2.AuthorizationPolicy(toml=text, sha256=request.draft_sha256, draft=self._draft)


@pytest.mark.parametrize(
    ("draft", "exit_code", "message"),
    [
        (True, cli.EXIT_INTEGRITY, "do not approve on the strength of it"),
        (False, cli.EXIT_UNEXPECTED, "does not serve proposed policies"),  # a server older than --draft
    ],
)
def test_a_text_that_is_not_the_proposed_one_is_refused(
    served: Served, draft: bool, exit_code: int, message: str
) -> None:
    lying, port = _serve(
        served.state_dir,
        lambda server: policy_pb2_grpc.add_PolicyServiceServicer_to_server(
            LyingPolicyService(draft=draft), server
        ),
    )
    try:
        code, out, err = served.kmsctl("policy", "show", "--draft", SHA, port=port)
    finally:
        lying.stop(grace=None).wait()
    assert code == exit_code and message in err
    assert "thermostat" not in out and '"*"' not in out  # nothing of the text is printed
