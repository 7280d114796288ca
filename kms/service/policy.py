"""The authorization policy in force, and changing it under dual control.

Which policy is in force
------------------------
The newest version installed under dual control (``PolicyRepository``, versions 1, 2, ...); before any was
installed, the server's ``[policy]`` file (version 0); without a file, no policy: every identity acts for
every product. Once a version is installed the file no longer matters (``kms serve`` logs a warning when
both exist), so every server process sharing the database applies the same policy whatever its own file
says.

Applying a change everywhere within a second
--------------------------------------------
``current()`` is what the authorization code asks on every call (``kms.server.auth``). It keeps the parsed
policy for ``ttl`` seconds (1 s, like ``KeyCache`` in ``kms.service.signing``); once that has passed it asks
the store for the newest version number only (one indexed query) and reads and parses the text again only
when the number changed. So a change installed by any process applies in every process within about
``ttl`` seconds, without a restart, and the process that installed it applies it at once: ``install``
calls ``forget``, and a refresh that was already under way when ``forget`` ran (it may have read the version
number before the install committed) does not store what it read (a generation counter), so the next call
reads the new version.

A version this server cannot parse
----------------------------------
A version is parsed when it is installed, but a server of another release may install a text this one's
parser refuses (a newer format during a rolling upgrade), or this release may refuse a text an older one
installed. Failing every call then would stop the service, including the officers who could fix it. So
``current()`` logs an error, once per such version, and applies the newest installed version older than it
that parses (in a running process, normally the one it applied before), else the ``[policy]`` file if this
server has one. It never falls back to no policy at all (every identity unscoped): with nothing to fall back
to, every call fails (``FailedPrecondition``), and ``kms policy reset`` on a server host is the way out.
``in_force()`` (what ``GetAuthorizationPolicy`` shows) is still the newest version.

A change
--------
``propose`` (at request time) checks the text: at most 64 KiB, valid TOML in the policy format (the
parser's message comes back as ``InvalidArgument``), and no lock-out (``require_officer_access``); it keeps
the text as a draft and returns its SHA-256 and the version in force, which the approval request records.
``install`` (at execution) reads that exact text back, checks it again, refuses if the policy in force is no
longer the one the request was made against (``FailedPrecondition``: approvers judged a change of *that*
policy), and stores it as the next version, recording the executing officer and the request.

Drafts are kept ``DRAFT_RETENTION`` (30 days), or the approval TTL if that is longer, after their last
proposal: a request outlives neither, so ``propose`` deletes older drafts as it adds one.

Break glass
-----------
``reset`` installs the ``[policy]`` file's text (or, without a file, no policy: ``default = "all"``) as the
next version, without dual control, for ``kms policy reset`` on a server host: the way out of a policy that
locks the officers out (the guard cannot catch every such text) or that this server cannot parse. It needs
the database and the server's configuration, not a certificate; it is recorded as a version like any other
(``created_by`` "local:USER", ``approval_id`` "break-glass", the reason in a comment line heading the text),
in the service log and in the audit log (``kms.cli``).

The policy is the service's own: both calls need an officer who acts for every product
(``SYSTEM_PRODUCT``, see ``kms.domain.policy``).
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kms.domain.approvals import DEFAULT_TTL
from kms.domain.errors import FailedPrecondition, InvalidArgument
from kms.domain.identity import Caller
from kms.domain.keys import SYSTEM_PRODUCT
from kms.domain.policy import (
    UNSCOPED,
    PolicyRepository,
    ProductPolicy,
    StoredPolicy,
    check_policy_size,
    parse_policy_text,
    require_officer_access,
    require_product,
)

_log = logging.getLogger("kms.policy")

DRAFT_RETENTION = timedelta(days=30)
"""How long a proposed text is kept after it was last proposed (longer if the approval TTL is)."""

BREAK_GLASS = "break-glass"
"""The ``approval_id`` of a version installed by ``kms policy reset`` rather than under dual control."""

NO_POLICY_TEXT = 'default = "all"\n'
"""What ``reset`` installs without a ``[policy]`` file: every identity acts for every product."""


@dataclass(frozen=True)
class PolicyProposal:
    """What an approval request of a policy change records: the text's hash and the policy it changes."""

    sha256: bytes
    base_version: int
    base_sha256: bytes


@dataclass(frozen=True)
class Reset:
    """What ``reset`` installed, and why the lock-out guard would have refused it (None if it would not)."""

    installed: StoredPolicy
    lockout: str | None


@dataclass(frozen=True)
class _Cached:
    expires: float
    version: int  # the newest version when it was read (the policy may be an older one, see the docstring)
    policy: ProductPolicy


def _one_line(text: str) -> str:
    """``text`` as one line of a TOML comment: control, format and separator characters become spaces."""
    kept = (" " if unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" else c for c in text)
    return " ".join("".join(kept).split())


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AuthorizationPolicies:
    def __init__(
        self,
        store: PolicyRepository,
        file_text: str = "",
        *,
        officers_needed: int = 3,
        request_ttl: timedelta = DEFAULT_TTL,
        ttl: float = 1.0,
        clock: Callable[[], datetime] = _utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``file_text`` is the ``[policy]`` file's text ("" without one); ``officers_needed`` is how many
        distinct officers a change takes (the requester and the required approvers); ``request_ttl`` is how
        long an approval request lives (drafts are kept at least that long)."""
        self._store = store
        self._file = StoredPolicy(0, file_text)
        self._file_policy = parse_policy_text(file_text) if file_text else UNSCOPED
        self._officers_needed = officers_needed
        self._draft_retention = max(DRAFT_RETENTION, request_ttl)
        self._ttl = ttl
        self._clock = clock
        self._monotonic = monotonic
        self._cached: _Cached | None = None
        self._lock = threading.Lock()  # one refresh at a time
        self._generation_lock = threading.Lock()  # guards _generation and the writes of _cached
        self._generation = 0  # forget() counts up; a refresh begun before stores nothing
        installed = store.latest_version()
        if file_text and installed:
            _log.warning(
                "the [policy] file is not in force: authorization policy version %d, installed under dual "
                "control, is (see 'kmsctl policy show')",
                installed,
            )

    # -- the policy in force ---------------------------------------------------------------------------

    def in_force(self) -> StoredPolicy:
        """The newest installed version, else the ``[policy]`` file (version 0, "" if none)."""
        return self._store.latest() or self._file

    def current(self) -> ProductPolicy:
        """The policy in force, at most ``ttl`` seconds old; after this process's ``forget()``, read again.

        A version this server cannot parse is not applied: the newest older one that parses is, and an
        error is logged (see the module docstring); ``FailedPrecondition`` if there is none.
        """
        cached = self._cached
        now = self._monotonic()
        if cached is not None and cached.expires > now:
            return cached.policy
        with self._lock:  # one refresh at a time; the others wait for it instead of querying too
            cached = self._cached
            if cached is not None and cached.expires > now:
                return cached.policy
            generation = self._generation
            version = self._store.latest_version()
            if cached is not None and cached.version == version:
                policy = cached.policy
            else:
                version, policy = self._load()
            fresh = _Cached(self._monotonic() + self._ttl, version, policy)
            with self._generation_lock:
                if self._generation == generation:  # else forget() ran meanwhile: what was read may be old
                    self._cached = fresh
            return policy

    def _load(self) -> tuple[int, ProductPolicy]:
        """The newest version's number and the policy to apply for it."""
        stored = self.in_force()
        try:
            return stored.version, self._parse(stored)
        except InvalidArgument as e:
            fallback, applied = self._fallback(stored.version)
            _log.error(
                "authorization policy version %d cannot be applied by this server (%s); applying %s until "
                "it is replaced ('kmsctl policy propose', or 'kms policy reset' on a server host)",
                stored.version,
                e,
                applied,
            )
            return stored.version, fallback

    def _fallback(self, unreadable: int) -> tuple[ProductPolicy, str]:
        """The newest version before ``unreadable`` that parses, else the ``[policy]`` file, and its name."""
        for number in range(unreadable - 1, 0, -1):
            older = self._store.version(number)
            if older is None:
                continue
            try:
                return self._parse(older), f"version {number}, the newest that it can"
            except InvalidArgument:
                continue
        if self._file.text:
            return self._file_policy, "the [policy] file (version 0)"
        raise FailedPrecondition(
            f"authorization policy version {unreadable} cannot be applied by this server, nor any version "
            "before it, and it has no [policy] file: every call is refused until a readable version is "
            "installed ('kms policy reset' on a server host)"
        )

    def _parse(self, stored: StoredPolicy) -> ProductPolicy:
        if stored.version == 0:
            return self._file_policy
        return parse_policy_text(stored.text, f"policy version {stored.version}")

    def forget(self) -> None:
        """Read the policy again at the next ``current()`` (this process installed a new version); a refresh
        already under way does not keep what it read."""
        with self._generation_lock:
            self._generation += 1
            self._cached = None

    def draft(self, sha256: bytes) -> str:
        """The text proposed under ``sha256``, for approvers to read what they approve (``NotFound``)."""
        if len(sha256) != 32:
            raise InvalidArgument(f"a policy SHA-256 is 32 bytes, not {len(sha256)}")
        return self._store.draft(sha256)

    # -- changes under dual control --------------------------------------------------------------------

    def _check(self, text: str) -> None:
        check_policy_size(text)
        require_officer_access(parse_policy_text(text), self._officers_needed)

    def propose(self, caller: Caller, text: str) -> PolicyProposal:
        """Check a proposed policy text and keep it as a draft; return what the request records."""
        require_product(caller, SYSTEM_PRODUCT)
        self._check(text)
        base = self.in_force()
        if text == base.text:
            raise FailedPrecondition(f"the proposed policy is the one in force (version {base.version})")
        now = self._clock()
        digest = self._store.add_draft(text, now, prune_before=now - self._draft_retention)
        return PolicyProposal(digest, base.version, base.sha256)

    def install(self, caller: Caller, proposal: PolicyProposal, approval_id: str) -> StoredPolicy:
        """Install the proposed text as the next version (see the module docstring)."""
        require_product(caller, SYSTEM_PRODUCT)
        text = self._store.draft(proposal.sha256)
        self._check(text)
        base = self.in_force()
        if (base.version, base.sha256) != (proposal.base_version, proposal.base_sha256):
            now = (
                f"version {base.version}"
                if base.version != proposal.base_version
                else "another [policy] file"
            )
            raise FailedPrecondition(
                f"the policy in force changed since the request (it was version {proposal.base_version}, it "
                f"is {now} now): request the change again against the policy in force"
            )
        installed = StoredPolicy(base.version + 1, text, self._clock(), caller.identity, approval_id)
        self._store.install(installed)
        self.forget()
        _log.info(
            "authorization policy version %d installed by %s (approval request %s)",
            installed.version,
            caller.identity,
            approval_id,
        )
        return installed

    # -- break glass -----------------------------------------------------------------------------------

    def reset(self, operator: str, reason: str) -> Reset:
        """Install the ``[policy]`` file's text (without one: no policy) as the next version, without dual
        control (``kms policy reset``, see the module docstring). ``operator`` is recorded as the installer
        ("local:USER"); ``reason`` (required) heads the text as a comment."""
        reason, operator = _one_line(reason), _one_line(operator)
        if not reason:
            raise InvalidArgument("a break-glass reset needs a reason (--reason)")
        body = self._file.text or NO_POLICY_TEXT
        now = self._clock()
        header = (
            f"# {BREAK_GLASS}: installed by 'kms policy reset' ({operator}, "
            f"{now.astimezone(UTC).isoformat(timespec='seconds')}): {reason}\n"
        )
        text = header + body
        lockout: str | None = None
        try:  # the file was parsed at startup, and the header is a comment
            require_officer_access(parse_policy_text(text), self._officers_needed)
        except InvalidArgument as e:
            lockout = str(e)
        installed = StoredPolicy(self._store.latest_version() + 1, text, now, operator, BREAK_GLASS)
        self._store.install(installed)
        self.forget()
        _log.warning(
            "break glass: authorization policy version %d (%s) installed by %s without dual control: %s",
            installed.version,
            "the [policy] file" if self._file.text else "no policy",
            operator,
            reason,
        )
        if lockout is not None:
            _log.warning("the version installed by break glass fails the lock-out guard: %s", lockout)
        return Reset(installed, lockout)


def proposal_from(sha256_hex: str, base_version: str, base_sha256_hex: str) -> PolicyProposal:
    """The proposal an approval request's parameters describe (``InvalidArgument`` if they are not)."""
    try:
        return PolicyProposal(bytes.fromhex(sha256_hex), int(base_version), bytes.fromhex(base_sha256_hex))
    except ValueError:
        raise InvalidArgument("the approval request does not describe a policy change") from None
