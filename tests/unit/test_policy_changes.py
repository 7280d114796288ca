"""Changing the authorization policy under dual control: the store (``kms.store.policy``, real SQLite), the
use cases and their cache (``kms.service.policy``), the lock-out guard (``kms.domain.policy``), the act
(``kms.server.policy_servicers.ChangePolicy``) through ``DualControl``, and the authorization code reading the
policy in force (``kms.server.auth``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kms.domain.approvals import PRODUCT_PARAMETER, Action
from kms.domain.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from kms.domain.identity import Caller, Role
from kms.domain.keys import SYSTEM_PRODUCT
from kms.domain.policy import (
    MAX_POLICY_BYTES,
    UNSCOPED,
    ProductPolicy,
    StoredPolicy,
    parse_policy_text,
    require_officer_access,
)
from kms.server import auth
from kms.server.policy_servicers import ChangePolicy, policy_pb
from kms.service.approvals import DualControl
from kms.service.policy import AuthorizationPolicies, proposal_from
from kms.store.approvals import SqliteApprovalRepository
from kms.store.database import Database
from kms.store.policy import SqlitePolicyRepository
from kmsapi.v1 import approvals_pb2

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
ALICE, BOB, CAROL = (
    Caller(f"spiffe://kms.dev/security-officer/{n}", Role.SECURITY_OFFICER) for n in ("alice", "bob", "carol")
)
OFFICERS = '"spiffe://kms.dev/security-officer/*" = "*"\n'
FILE = 'default = "all"\n'
SCOPED = f'default = "all"\n[identities]\n"spiffe://kms.dev/build-server/dev" = ["p-a"]\n{OFFICERS}'
LOCKOUT = 'default = "none"\n[identities]\n"spiffe://kms.dev/security-officer/*" = ["p-a"]\n'


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    with Database.open(tmp_path / "kms.db") as database:
        yield database


def _policies(db: Database, file_text: str = FILE) -> AuthorizationPolicies:
    return AuthorizationPolicies(SqlitePolicyRepository(db), file_text, clock=lambda: T0)


# -- the store -------------------------------------------------------------------------------------------


def test_drafts_are_kept_by_hash_and_versions_follow_each_other(db: Database) -> None:
    store = SqlitePolicyRepository(db)
    assert (store.latest_version(), store.latest()) == (0, None)
    digest = store.add_draft(SCOPED, T0)
    assert store.add_draft(SCOPED, T0) == digest == StoredPolicy(0, SCOPED).sha256
    assert store.draft(digest) == SCOPED
    with pytest.raises(NotFound, match="no proposed policy"):
        store.draft(b"\0" * 32)
    with pytest.raises(FailedPrecondition, match="cannot follow"):
        store.install(StoredPolicy(2, SCOPED, T0, ALICE.identity, "r1"))
    store.install(StoredPolicy(1, SCOPED, T0, ALICE.identity, "r1"))
    with pytest.raises(FailedPrecondition, match="installed meanwhile"):
        store.install(StoredPolicy(1, FILE, T0, BOB.identity, "r2"))
    assert store.latest_version() == 1
    assert store.latest() == StoredPolicy(1, SCOPED, T0, ALICE.identity, "r1")


def test_an_altered_version_is_data_loss(db: Database) -> None:
    store = SqlitePolicyRepository(db)
    store.install(StoredPolicy(1, SCOPED, T0, ALICE.identity, "r1"))
    with db.transaction() as session:
        session.execute("UPDATE policy_versions SET text = ? WHERE version = 1", [FILE])
    with pytest.raises(DataLoss, match="does not match its hash"):
        store.latest()


# -- the lock-out guard ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        (f'default = "none"\n[identities]\n{OFFICERS}', True),
        ('default = "none"\n[identities]\n"spiffe://kms.dev/*" = "*"\n', True),  # covers the officers
        ('default = "all"\n', True),  # unnamed officers keep every product
        ('default = "all"\n[identities]\n"spiffe://kms.dev/security-officer/dev" = ["p-a"]\n', True),
        ('default = "none"\n', False),
        (LOCKOUT, False),
        ('default = "all"\n[identities]\n"spiffe://kms.dev/security-officer/*" = ["p-a"]\n', False),
        ('default = "all"\n[identities]\n"spiffe://kms.dev/*" = ["p-a"]\n', False),
        ('default = "none"\n[identities]\n"spiffe://kms.dev/auditor/*" = "*"\n', False),  # not officers
        ('default = "none"\n[identities]\n"spiffe://kms.dev/security-officer/a" = "*"\n', False),  # 1 < 3
        (
            'default = "none"\n[identities]\n'
            + "".join(f'"spiffe://kms.dev/security-officer/{n}" = "*"\n' for n in "abc"),
            True,  # the requester and two approvers
        ),
    ],
)
def test_policies_that_lock_the_officers_out_are_refused(text: str, accepted: bool) -> None:
    policy = parse_policy_text(text)
    if accepted:
        require_officer_access(policy, 3)
    else:
        with pytest.raises(InvalidArgument, match="lock the security officers out"):
            require_officer_access(policy, 3)


# -- proposing and installing ----------------------------------------------------------------------------


def test_the_policy_in_force_is_the_newest_version_else_the_file(db: Database) -> None:
    assert _policies(db, "").in_force() == StoredPolicy(0, "")
    assert _policies(db, "").current() == UNSCOPED
    policies = _policies(db)
    assert policies.in_force() == StoredPolicy(0, FILE)
    installed = policies.install(ALICE, policies.propose(ALICE, SCOPED), "req-1")
    assert installed == StoredPolicy(1, SCOPED, T0, ALICE.identity, "req-1")
    assert _policies(db, "").in_force() == installed  # the file no longer matters
    message = policy_pb(installed)
    assert (message.version, message.toml, message.updated_by) == (1, SCOPED, ALICE.identity)
    assert message.update_request == "approvals/req-1" and message.sha256 == installed.sha256
    assert message.update_time.ToDatetime(tzinfo=UTC) == T0
    assert not policy_pb(StoredPolicy(0, FILE)).HasField("update_time")


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("default = ", InvalidArgument, "not valid TOML"),
        ('default = "some"', InvalidArgument, 'default must be "all" or "none"'),
        (
            'default = "all"\n[identities]\n"spiffe://d/r/x" = ["kms"]',
            InvalidArgument,
            "service's own product",
        ),
        (FILE + "#" * MAX_POLICY_BYTES, InvalidArgument, "at most 64 KiB"),
        (LOCKOUT, InvalidArgument, "lock the security officers out"),
        (FILE, FailedPrecondition, "is the one in force"),
    ],
)
def test_a_bad_proposal_is_refused_at_once(
    db: Database, text: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        _policies(db).propose(ALICE, text)
    with db.snapshot() as session:
        assert session.rows("SELECT * FROM policy_drafts") == []


def test_only_officers_with_every_product_propose_and_install(db: Database) -> None:
    policies = _policies(db)
    scoped = Caller(ALICE.identity, Role.SECURITY_OFFICER, frozenset({"p-a", "p-b"}))
    with pytest.raises(PermissionDenied, match="'kms'"):
        policies.propose(scoped, SCOPED)
    proposal = policies.propose(ALICE, SCOPED)
    with pytest.raises(PermissionDenied, match="'kms'"):
        policies.install(scoped, proposal, "req-1")
    assert policies.in_force().version == 0


def test_an_approved_change_of_a_policy_no_longer_in_force_is_refused(db: Database) -> None:
    policies = _policies(db)
    first, second = policies.propose(ALICE, SCOPED), policies.propose(BOB, SCOPED + "# v2\n")
    policies.install(CAROL, first, "req-1")
    with pytest.raises(FailedPrecondition, match="changed since the request"):
        policies.install(CAROL, second, "req-2")
    with pytest.raises(FailedPrecondition, match="changed since the request"):
        policies.install(CAROL, first, "req-1")  # executing the same change twice
    assert policies.in_force().version == 1


def test_a_change_requested_against_another_policy_file_is_refused(db: Database) -> None:
    """Version 0 is each process's own file: its hash tells a restart with an edited file apart."""
    proposal = _policies(db).propose(ALICE, SCOPED)
    restarted = _policies(db, FILE + "# edited\n")
    with pytest.raises(FailedPrecondition, match="changed since the request"):
        restarted.install(BOB, proposal, "req-1")
    with pytest.raises(InvalidArgument, match="does not describe a policy change"):
        proposal_from("zz", "0", "")
    assert proposal_from(proposal.sha256.hex(), "0", proposal.base_sha256.hex()) == proposal


def test_current_reads_the_version_number_each_ttl_and_the_text_only_when_it_changed(db: Database) -> None:
    class Counting(SqlitePolicyRepository):
        latest_calls = 0

        def latest(self) -> StoredPolicy | None:
            Counting.latest_calls += 1
            return super().latest()

    ticks = Ticks()
    reader = AuthorizationPolicies(Counting(db), FILE, ttl=1.0, clock=lambda: T0, monotonic=ticks)
    writer = _policies(db)  # another server process on the same database
    build = "spiffe://kms.dev/build-server/dev"
    assert reader.current().scope_of(build) is None
    loads = Counting.latest_calls
    writer.install(ALICE, writer.propose(ALICE, SCOPED), "req-1")
    ticks.now += 0.5
    assert reader.current().scope_of(build) is None  # cached: still the old policy within the TTL
    ticks.now += 0.6
    assert reader.current().scope_of(build) == frozenset({"p-a"})  # the TTL passed: the new version
    assert Counting.latest_calls == loads + 1
    for _ in range(3):
        ticks.now += 1.1
        assert reader.current().scope_of(build) == frozenset({"p-a"})
    assert Counting.latest_calls == loads + 1  # unchanged number: the text is not read again
    assert writer.current().scope_of(build) == frozenset({"p-a"})  # the installer applies it at once


# -- the act, through dual control -----------------------------------------------------------------------


def test_a_policy_change_is_requested_approved_by_others_and_executed(db: Database) -> None:
    policies = _policies(db)
    dual = DualControl(SqliteApprovalRepository(db), lambda: T0)
    act = ChangePolicy(policies)
    target, parameters = act.prepare(ALICE, approvals_pb2.RequestPolicyChangeRequest(policy_toml=SCOPED))
    assert parameters[PRODUCT_PARAMETER] == SYSTEM_PRODUCT
    assert parameters["policy_sha256"] == StoredPolicy(0, SCOPED).sha256.hex()
    assert (parameters["base_version"], parameters["base_sha256"]) == (
        "0",
        StoredPolicy(0, FILE).sha256.hex(),
    )
    request = dual.request(ALICE, Action.CHANGE_AUTHORIZATION_POLICY, target, parameters)
    with pytest.raises(PermissionDenied, match="cannot vote"):
        dual.approve(ALICE, request.id)
    scoped_bob = Caller(BOB.identity, Role.SECURITY_OFFICER, frozenset({"p-a"}))
    with pytest.raises(PermissionDenied, match="'kms'"):
        dual.approve(scoped_bob, request.id)
    assert dual.list_for(scoped_bob) == []
    dual.approve(BOB, request.id)
    dual.approve(CAROL, request.id)
    executed, response = dual.execute(ALICE, request.id, lambda r: act.execute(ALICE, r))
    assert executed.executed_by == ALICE.identity
    assert (response.policy.version, response.policy.toml) == (1, SCOPED)
    assert response.policy.update_request == f"approvals/{request.id}"
    assert policies.in_force().version == 1


# -- the authorization code ------------------------------------------------------------------------------


@pytest.fixture
def restore_policy_source() -> Iterator[None]:
    yield
    auth.use_product_policy(UNSCOPED)


def test_callers_are_scoped_by_the_policy_in_force_at_each_call(restore_policy_source: None) -> None:
    context = {
        "transport_security_type": [b"ssl"],
        "x509_subject_alternative_name": [b"spiffe://kms.dev/build-server/dev"],
    }
    policies: list[ProductPolicy] = [UNSCOPED]
    auth.use_policy_source(lambda: policies[-1])
    assert auth.caller_from_auth_context(context).products is None
    policies.append(parse_policy_text(SCOPED))
    assert auth.caller_from_auth_context(context).products == frozenset({"p-a"})
    auth.use_product_policy(UNSCOPED)
    assert auth.caller_from_auth_context(context).products is None


def test_install_is_refused_for_a_tampered_draft(db: Database) -> None:
    policies = _policies(db)
    proposal = policies.propose(ALICE, SCOPED)
    with db.transaction() as session:
        session.execute("UPDATE policy_drafts SET text = ?", [LOCKOUT])
    with pytest.raises(DataLoss, match="does not match"):
        policies.install(BOB, proposal, "req-1")
    assert policies.in_force().version == 0


def test_kmsctl_prints_an_executed_policy_change() -> None:
    """``executed_policy_change`` is what ``kmsctl approvals execute`` shows for a policy change."""
    from kmsctl._policy_cli import executed_policy_change

    installed = StoredPolicy(3, SCOPED, T0, ALICE.identity, "abc123")
    response = approvals_pb2.ExecuteRequestResponse(
        request=approvals_pb2.ApprovalRequest(id="abc123", executed_by=ALICE.identity),
        policy=policy_pb(installed),
    )
    outcome = executed_policy_change(response)
    assert outcome.data["policy"] == {
        "version": 3,
        "toml": SCOPED,
        "sha256": installed.sha256.hex(),
        "update_time": "2026-01-01T12:00:00+00:00",
        "updated_by": ALICE.identity,
        "update_request": "approvals/abc123",
    }
    assert outcome.data["request"]["id"] == "abc123"
    assert "version 3" in outcome.summary and installed.sha256.hex() in outcome.summary
