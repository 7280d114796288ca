"""Changing the authorization policy under dual control: the store (``kms.store.policy``, real SQLite), the
use cases and their cache (``kms.service.policy``), the lock-out guard (``kms.domain.policy``), the act
(``kms.server.policy_servicers.ChangePolicy``) through ``DualControl``, and the authorization code reading the
policy in force (``kms.server.auth``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
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
from kms.service.policy import BREAK_GLASS, NO_POLICY_TEXT, AuthorizationPolicies, proposal_from
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


def _identities(default: str, *rules: tuple[str, str]) -> str:
    lines = "".join(f'"spiffe://{pattern}" = {products}\n' for pattern, products in rules)
    return f'default = "{default}"\n[identities]\n{lines}'


EVERY = '"*"'
THERMOSTAT = '["thermostat"]'
TD = "kms.example.com"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        # The review's reproduction: the longer officer pattern wins over the broad "*".
        (
            _identities("none", (f"{TD}/*", EVERY), (f"{TD}/security-officer/*", THERMOSTAT)),
            "security-officer/<unnamed> acts for 'thermostat'",
        ),
        # Exact names win over the officers' "*" pattern: every officer the policy knows of is scoped.
        (
            _identities(
                "none",
                (f"{TD}/security-officer/*", EVERY),
                *((f"{TD}/security-officer/{n}", THERMOSTAT) for n in ("alice", "bob", "carol")),
            ),
            "scopes 3 officers by name",
        ),
        # Two of the five it names keep every product: not enough, whatever the default grants.
        (
            _identities(
                "all",
                *((f"{TD}/security-officer/{n}", EVERY) for n in ("bob", "carol")),
                *((f"{TD}/security-officer/{n}", THERMOSTAT) for n in ("alice", "dave", "erin")),
            ),
            "only 2 officer identities named exactly act",
        ),
        # default = "all" does not reach the officers a pattern covers.
        (
            _identities("all", (f"{TD}/*", THERMOSTAT), (f"{TD}/build-server/*", EVERY)),
            "security-officer/<unnamed> acts for 'thermostat'",
        ),
        # An officer pattern deeper than the role covers only that team; the others get no product.
        (
            _identities("none", (f"{TD}/security-officer/team/*", THERMOSTAT)),
            "no product",
        ),
        # An exact "*" identity under a pattern that scopes the rest: one officer is not three.
        (
            _identities(
                "none", (f"{TD}/security-officer/*", THERMOSTAT), (f"{TD}/security-officer/a", EVERY)
            ),
            "1 officer identity named exactly acts",
        ),
    ],
)
def test_a_policy_is_judged_by_what_its_resolution_gives_officers(text: str, reason: str) -> None:
    policy = parse_policy_text(text)
    with pytest.raises(InvalidArgument, match="lock the security officers out") as refused:
        require_officer_access(policy, 3)
    assert reason in str(refused.value)
    # The refusal is right: alice, like every officer the policy names or scopes, is not unscoped.
    assert policy.scope_of(f"spiffe://{TD}/security-officer/alice") is not None


@pytest.mark.parametrize(
    "text",
    [
        # A product-specific officer (a contractor, say) among officers who keep every product.
        _identities("none", (f"{TD}/security-officer/*", EVERY), (f"{TD}/security-officer/ext", THERMOSTAT)),
        # default = "all" with one officer scoped: the officers no rule names keep every product.
        _identities("all", (f"{TD}/security-officer/alice", THERMOSTAT)),
        # A broad pattern scoped, the officers' own pattern unscoped: the longer one wins, for the officers.
        _identities("none", (f"{TD}/*", THERMOSTAT), (f"{TD}/security-officer/*", EVERY)),
        # Officers scoped by pattern, but three named officers keep every product.
        _identities(
            "none",
            (f"{TD}/security-officer/*", THERMOSTAT),
            *((f"{TD}/security-officer/{n}", EVERY) for n in ("alice", "bob", "carol")),
        ),
        # A team of officers under a deeper pattern keeps every product.
        _identities(
            "none", (f"{TD}/security-officer/*", THERMOSTAT), (f"{TD}/security-officer/sec/*", EVERY)
        ),
        _identities("none", (f"{TD}/security-officer/sec/*", EVERY)),
        # Officers of one trust domain scoped, those of another not.
        _identities("none", ("old.example.com/*", THERMOSTAT), (f"{TD}/security-officer/*", EVERY)),
        # Even a rule spelling the synthetic identity does not fool the guard into counting it.
        _identities(
            "none",
            (f"{TD}/security-officer/*", EVERY),
            (f"{TD}/security-officer/(an officer no rule names)", THERMOSTAT),
        ),
    ],
)
def test_policies_that_leave_officers_with_every_product_are_accepted(text: str) -> None:
    require_officer_access(parse_policy_text(text), 3)


def test_the_guard_counts_the_officers_a_change_needs() -> None:
    two = _identities("none", *((f"{TD}/security-officer/{n}", EVERY) for n in ("alice", "bob")))
    require_officer_access(parse_policy_text(two), 2)
    with pytest.raises(InvalidArgument, match="needs 3 officers"):
        require_officer_access(parse_policy_text(two), 3)
    scoped_pair = _identities(
        "none",
        (f"{TD}/security-officer/*", EVERY),
        *((f"{TD}/security-officer/{n}", THERMOSTAT) for n in ("alice", "bob")),
    )
    require_officer_access(parse_policy_text(scoped_pair), 3)  # fewer scoped by name than a change needs
    with pytest.raises(InvalidArgument, match="scopes 2 officers by name"):
        require_officer_access(parse_policy_text(scoped_pair), 2)


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


def test_a_refresh_begun_before_an_install_does_not_keep_the_old_policy(db: Database) -> None:
    """The installing process applies its change at once even when a refresh read the version number just
    before the install committed: ``forget()`` makes that refresh drop what it read."""

    class InstallsMidRefresh(SqlitePolicyRepository):
        during_next_read: Callable[[], object] | None = None

        def latest_version(self) -> int:
            version = super().latest_version()  # read before the install below commits
            hook, self.during_next_read = self.during_next_read, None
            if hook is not None:
                hook()
            return version

    store = InstallsMidRefresh(db)
    ticks = Ticks()
    policies = AuthorizationPolicies(store, FILE, ttl=1.0, clock=lambda: T0, monotonic=ticks)
    build = "spiffe://kms.dev/build-server/dev"
    assert policies.current().scope_of(build) is None
    proposal = policies.propose(ALICE, SCOPED)
    ticks.now += 1.1
    store.during_next_read = lambda: policies.install(BOB, proposal, "req-1")
    assert policies.current().scope_of(build) is None  # this call began before the install: the old policy
    assert store.during_next_read is None  # the install ran inside that refresh
    assert policies.current().scope_of(build) == frozenset({"p-a"})  # no tick later: the new one at once


UNPARSABLE = 'default = "some"\n'  # what this parser refuses (a newer format, say)


def _install_raw(db: Database, version: int, text: str) -> None:
    """Store a version as another server release might have, without this release's checks."""
    SqlitePolicyRepository(db).install(StoredPolicy(version, text, T0, CAROL.identity, f"req-{version}"))


def test_a_version_this_server_cannot_parse_leaves_the_last_one_it_can_in_force(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    ticks = Ticks()
    policies = AuthorizationPolicies(SqlitePolicyRepository(db), FILE, clock=lambda: T0, monotonic=ticks)
    build = "spiffe://kms.dev/build-server/dev"
    policies.install(ALICE, policies.propose(ALICE, SCOPED), "req-1")
    assert policies.current().scope_of(build) == frozenset({"p-a"})
    _install_raw(db, 2, UNPARSABLE)
    with caplog.at_level(logging.ERROR, logger="kms.policy"):
        for _ in range(3):
            ticks.now += 1.1
            assert policies.current().scope_of(build) == frozenset({"p-a"})  # version 1 still applies
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # once per version, not once a second
    assert "version 2 cannot be applied" in errors[0] and "version 1, the newest that it can" in errors[0]
    assert policies.in_force().version == 2  # what GetAuthorizationPolicy shows is still the newest

    restarted = AuthorizationPolicies(SqlitePolicyRepository(db), "", clock=lambda: T0)
    assert restarted.current().scope_of(build) == frozenset({"p-a"})  # a new process agrees

    _install_raw(db, 3, SCOPED.replace('["p-a"]', '["p-b"]'))  # a readable version applies again
    ticks.now += 1.1
    assert policies.current().scope_of(build) == frozenset({"p-b"})


def test_with_no_readable_version_the_file_applies_and_never_no_policy(tmp_path: Path) -> None:
    build = "spiffe://kms.dev/build-server/dev"
    with Database.open(tmp_path / "kms.db") as database:
        _install_raw(database, 1, UNPARSABLE)
        with_file = AuthorizationPolicies(SqlitePolicyRepository(database), SCOPED, clock=lambda: T0)
        assert with_file.current().scope_of(build) == frozenset({"p-a"})
        without = AuthorizationPolicies(SqlitePolicyRepository(database), "", clock=lambda: T0)
        with pytest.raises(FailedPrecondition, match="kms policy reset"):
            without.current()  # not UNSCOPED: an unreadable policy must not open everything


def test_drafts_are_pruned_after_the_retention_when_a_new_one_is_added(db: Database) -> None:
    store = SqlitePolicyRepository(db)
    old, again, new = (store.add_draft(text, T0) for text in ("# old\n", "# again\n", "# new\n"))
    store.add_draft("# again\n", T0 + timedelta(days=20))  # proposed again: dated anew
    store.add_draft("# newest\n", T0 + timedelta(days=31), prune_before=T0 + timedelta(days=1))
    with pytest.raises(NotFound):
        store.draft(old)
    with pytest.raises(NotFound):
        store.draft(new)
    assert store.draft(again) == "# again\n"

    now = [T0]
    policies = AuthorizationPolicies(SqlitePolicyRepository(db), FILE, clock=lambda: now[0])
    kept = policies.propose(ALICE, SCOPED)
    now[0] = T0 + timedelta(days=29)
    policies.propose(ALICE, SCOPED + "# 2\n")
    assert policies.draft(kept.sha256) == SCOPED  # within 30 days
    now[0] = T0 + timedelta(days=31)
    policies.propose(ALICE, SCOPED + "# 3\n")
    with pytest.raises(NotFound):
        policies.draft(kept.sha256)

    long_lived = AuthorizationPolicies(
        SqlitePolicyRepository(db), FILE, request_ttl=timedelta(days=60), clock=lambda: now[0]
    )
    kept = long_lived.propose(ALICE, SCOPED)
    now[0] += timedelta(days=45)
    long_lived.propose(ALICE, SCOPED + "# 4\n")
    assert long_lived.draft(kept.sha256) == SCOPED  # a request may live 60 days: so does its draft


# -- break glass -----------------------------------------------------------------------------------------


def test_reset_installs_the_file_without_dual_control_and_applies_at_once(db: Database) -> None:
    ticks = Ticks()
    policies = AuthorizationPolicies(SqlitePolicyRepository(db), SCOPED, clock=lambda: T0, monotonic=ticks)
    policies.install(ALICE, policies.propose(ALICE, FILE), "r1")  # unscoped, replacing the file
    build = "spiffe://kms.dev/build-server/dev"
    assert policies.current().scope_of(build) is None
    reset = policies.reset("local:root", "officers\nlocked out\x1b[2J  by v1")
    installed = reset.installed
    assert (installed.version, installed.created_by, installed.approval_id) == (2, "local:root", BREAK_GLASS)
    header, body = installed.text.split("\n", 1)
    assert header == (
        "# break-glass: installed by 'kms policy reset' (local:root, 2026-01-01T12:00:00+00:00): "
        "officers locked out [2J by v1"  # one comment line: no control characters survive
    )
    assert body == SCOPED and reset.lockout is None
    assert policies.in_force() == installed
    assert policies.current().scope_of(build) == frozenset({"p-a"})  # no tick later: at once
    assert policy_pb(installed).update_request == BREAK_GLASS  # names no approval request

    bare = AuthorizationPolicies(SqlitePolicyRepository(db), "", clock=lambda: T0)
    reset = bare.reset("local:ops", "undo")
    assert reset.installed.version == 3 and reset.installed.text.endswith("\n" + NO_POLICY_TEXT)
    assert bare.current().scope_of(build) is None and reset.lockout is None
    with pytest.raises(InvalidArgument, match="needs a reason"):
        bare.reset("local:ops", " \n\t")
    assert bare.in_force().version == 3


def test_reset_installs_a_file_that_fails_the_guard_and_says_so(db: Database) -> None:
    reset = AuthorizationPolicies(SqlitePolicyRepository(db), LOCKOUT, clock=lambda: T0).reset("local:a", "x")
    assert reset.installed.version == 1 and reset.installed.text.endswith("\n" + LOCKOUT)
    assert reset.lockout is not None and "lock the security officers out" in reset.lockout


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
