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
``ttl`` seconds, without a restart, and the process that installed it applies it at once.

A change
--------
``propose`` (at request time) checks the text: at most 64 KiB, valid TOML in the policy format (the
parser's message comes back as ``InvalidArgument``), and no lock-out (``require_officer_access``); it keeps
the text as a draft and returns its SHA-256 and the version in force, which the approval request records.
``install`` (at execution) reads that exact text back, checks it again, refuses if the policy in force is no
longer the one the request was made against (``FailedPrecondition``: approvers judged a change of *that*
policy), and stores it as the next version, recording the executing officer and the request.

The policy is the service's own: both calls need an officer who acts for every product
(``SYSTEM_PRODUCT``, see ``kms.domain.policy``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

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


@dataclass(frozen=True)
class PolicyProposal:
    """What an approval request of a policy change records: the text's hash and the policy it changes."""

    sha256: bytes
    base_version: int
    base_sha256: bytes


@dataclass(frozen=True)
class _Cached:
    expires: float
    version: int
    policy: ProductPolicy


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AuthorizationPolicies:
    def __init__(
        self,
        store: PolicyRepository,
        file_text: str = "",
        *,
        officers_needed: int = 3,
        ttl: float = 1.0,
        clock: Callable[[], datetime] = _utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``file_text`` is the ``[policy]`` file's text ("" without one); ``officers_needed`` is how many
        distinct officers a change takes (the requester and the required approvers)."""
        self._store = store
        self._file = StoredPolicy(0, file_text)
        self._file_policy = parse_policy_text(file_text) if file_text else UNSCOPED
        self._officers_needed = officers_needed
        self._ttl = ttl
        self._clock = clock
        self._monotonic = monotonic
        self._cached: _Cached | None = None
        self._lock = threading.Lock()
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
        """The policy in force, at most ``ttl`` seconds old (see the module docstring)."""
        cached = self._cached
        now = self._monotonic()
        if cached is not None and cached.expires > now:
            return cached.policy
        with self._lock:  # one refresh at a time; the others wait for it instead of querying too
            cached = self._cached
            if cached is not None and cached.expires > now:
                return cached.policy
            version = self._store.latest_version()
            if cached is not None and cached.version == version:
                policy = cached.policy
            else:
                stored = self.in_force()
                version, policy = stored.version, self._parse(stored)
            self._cached = _Cached(self._monotonic() + self._ttl, version, policy)
            return policy

    def _parse(self, stored: StoredPolicy) -> ProductPolicy:
        if stored.version == 0:
            return self._file_policy
        return parse_policy_text(stored.text, f"policy version {stored.version}")

    def forget(self) -> None:
        """Read the policy again at the next ``current()`` (this process installed a new version)."""
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
        digest = self._store.add_draft(text, self._clock())
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


def proposal_from(sha256_hex: str, base_version: str, base_sha256_hex: str) -> PolicyProposal:
    """The proposal an approval request's parameters describe (``InvalidArgument`` if they are not)."""
    try:
        return PolicyProposal(bytes.fromhex(sha256_hex), int(base_version), bytes.fromhex(base_sha256_hex))
    except ValueError:
        raise InvalidArgument("the approval request does not describe a policy change") from None
