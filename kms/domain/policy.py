"""Product scope: which products an authenticated identity may act for.

Authorization has two dimensions. The role (``kms.server.auth``, ``METHOD_ROLES``) decides which RPCs an
identity may call; it is checked by one interceptor before any request message is read. The product scope
decides which products those calls may touch; the product is often known only from the request body or from
stored state (the product of a key, of a device), so each use case calls ``require_product`` once, at the
point where the product is known, and before it reads a secret, uses a key or writes anything.

A ``ProductPolicy`` maps identities to products. A rule names either one identity exactly
(``spiffe://example.com/build-server/ci-7``) or every identity under a prefix
(``spiffe://example.com/build-server/*``: a final ``/*`` and nowhere else). An exact rule wins over any
pattern; among patterns the longest prefix wins, so rules never depend on their order. Each rule scopes to
a set of products or to every product. An identity no rule names gets ``default``: every product
(``default_all``) or none.

The scope travels on the ``Caller`` (``Caller.products``; ``None`` is every product), attached once per
call by ``scoped_caller``. Refusals are ``PermissionDenied`` and name the product.

The service's own product
-------------------------
``SYSTEM_PRODUCT`` (``kms``) names what belongs to the service rather than to a product: the audit key and
the authorization policy itself. Only an identity with every product (``"*"``, or an unscoped default) acts
for it; a policy cannot grant it by name (``parse_policy`` refuses ``"kms"`` in a list), so an officer scoped
to some products can never rewrite the policy that scopes it.

Policy text and versions
------------------------
``parse_policy_text`` reads the TOML format of the ``[policy]`` file (``kms.server.policy_file``), which is
also the text an officer proposes for a change under dual control (``kms.service.policy``). A change is
refused when it would lock the officers out (``require_officer_access``). ``StoredPolicy`` is one installed
version; ``PolicyRepository`` is where versions and proposed texts live (``kms.store.policy``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from kms.domain.errors import InvalidArgument, PermissionDenied
from kms.domain.identity import Caller, Role
from kms.domain.keys import SYSTEM_PRODUCT, validate_product

_SPIFFE = "spiffe://"
_OFFICER_ROLE = Role.SECURITY_OFFICER.value
_DEFAULTS = {"all": True, "none": False}

MAX_POLICY_BYTES = 64 * 1024
"""The largest policy text (UTF-8) accepted for a change (``RequestPolicyChange``)."""


@dataclass(frozen=True)
class ScopeRule:
    """``pattern`` (one identity, or a prefix ending in ``/*``) may act for ``products`` (None: all)."""

    pattern: str
    products: frozenset[str] | None

    def __post_init__(self) -> None:
        body = self.pattern.removeprefix(_SPIFFE)
        if not self.pattern.startswith(_SPIFFE) or not body:
            raise InvalidArgument(f"policy: {self.pattern!r} is not a spiffe:// identity or pattern")
        if "*" in body and (body.count("*") != 1 or not body.endswith("/*") or body == "/*"):
            raise InvalidArgument(
                f"policy: {self.pattern!r}: '*' may only end a pattern, as in 'spiffe://example.com/role/*'"
            )
        for product in self.products or ():
            validate_product(product)
            if product == SYSTEM_PRODUCT:
                raise InvalidArgument(
                    f"policy: {self.pattern!r}: {SYSTEM_PRODUCT!r} is the service's own product (audit key, "
                    'authorization policy); only "*" (every product) grants it'
                )

    @property
    def is_prefix(self) -> bool:
        return self.pattern.endswith("/*")

    def matches(self, identity: str) -> bool:
        if self.is_prefix:
            return identity.startswith(self.pattern[:-1])
        return identity == self.pattern

    def _segments(self) -> list[str]:
        """The trust domain and path segments the rule fixes (a pattern's final ``*`` dropped)."""
        segments = self.pattern.removeprefix(_SPIFFE).split("/")
        return segments[:-1] if self.is_prefix else segments

    def may_name_officers(self) -> bool:
        """Whether some security officer identity (``spiffe://TD/security-officer/NAME``) matches."""
        segments = self._segments()
        if self.is_prefix:
            return len(segments) == 1 or segments[1] == _OFFICER_ROLE
        return len(segments) >= 3 and segments[1] == _OFFICER_ROLE


@dataclass(frozen=True)
class ProductPolicy:
    """Identity rules and what an identity no rule names gets (every product, or none)."""

    rules: tuple[ScopeRule, ...] = ()
    default_all: bool = True

    def __post_init__(self) -> None:
        patterns = [rule.pattern for rule in self.rules]
        duplicates = sorted({p for p in patterns if patterns.count(p) > 1})
        if duplicates:
            raise InvalidArgument(f"policy: identities named more than once: {duplicates}")

    def scope_of(self, identity: str) -> frozenset[str] | None:
        """The products ``identity`` may act for; ``None`` means every product."""
        for rule in self.rules:
            if not rule.is_prefix and rule.matches(identity):
                return rule.products
        prefixes = [rule for rule in self.rules if rule.is_prefix and rule.matches(identity)]
        if prefixes:
            return max(prefixes, key=lambda rule: len(rule.pattern)).products
        return None if self.default_all else frozenset()


UNSCOPED = ProductPolicy()
"""No rules and ``default = "all"``: every identity acts for every product (role checks only)."""


def scoped_caller(caller: Caller, policy: ProductPolicy) -> Caller:
    """``caller`` with the product scope ``policy`` gives its identity."""
    return dataclasses.replace(caller, products=policy.scope_of(caller.identity))


def in_scope(caller: Caller, product: str) -> bool:
    """Whether ``caller`` may act for ``product``; ``SYSTEM_PRODUCT`` needs every product."""
    if caller.products is None:
        return True
    return product != SYSTEM_PRODUCT and product in caller.products


def require_product(caller: Caller, product: str) -> None:
    """Refuse (``PermissionDenied``, naming the product) unless ``caller`` may act for ``product``."""
    if not in_scope(caller, product):
        only = "; only identities with every product act for it" if product == SYSTEM_PRODUCT else ""
        raise PermissionDenied(
            f"{caller.identity} may not act for product {product!r} "
            f"(its product scope: {_describe(caller.products or ())}){only}"
        )


def _describe(products: Iterable[str]) -> str:
    names = sorted(products)
    return ", ".join(repr(p) for p in names) if names else "no product"


# -- the policy text -------------------------------------------------------------------------------------


def parse_policy(doc: dict[str, Any]) -> ProductPolicy:
    """A policy from a decoded policy document; ``InvalidArgument`` names the bad key."""
    unknown = set(doc) - {"default", "identities"}
    if unknown:
        raise InvalidArgument(f"policy: unknown key(s) {sorted(unknown)}")
    default = doc.get("default")
    if default not in _DEFAULTS:
        raise InvalidArgument(f'policy: default must be "all" or "none", got {default!r}')
    identities = doc.get("identities", {})
    if not isinstance(identities, dict):
        raise InvalidArgument("policy: [identities] must be a table")
    rules = []
    for pattern, products in identities.items():
        if products == "*":
            rules.append(ScopeRule(pattern, None))
        elif isinstance(products, list) and all(isinstance(p, str) for p in products):
            rules.append(ScopeRule(pattern, frozenset(products)))
        else:
            raise InvalidArgument(
                f'policy: {pattern!r} must map to a list of product names or "*", got {products!r}'
            )
    return ProductPolicy(tuple(rules), default_all=_DEFAULTS[default])


def parse_policy_text(text: str, source: str = "the policy") -> ProductPolicy:
    """A policy from its TOML text (the ``[policy]`` file format). ``InvalidArgument`` says what is wrong;
    ``source`` names the text in that message (a file name, say)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{source} is not valid TOML: {e}") from e
    return parse_policy(doc)


def check_policy_size(text: str) -> None:
    """Refuse (``InvalidArgument``) a proposed text longer than ``MAX_POLICY_BYTES``."""
    size = len(text.encode("utf-8"))
    if size > MAX_POLICY_BYTES:
        raise InvalidArgument(
            f"the policy is {size} bytes; at most 64 KiB ({MAX_POLICY_BYTES} bytes) of TOML is accepted"
        )


def _unnamed_identity(base: str, exact: set[str]) -> str:
    """An identity under ``base`` (ending in ``/``) that no exact rule names and no deeper pattern covers: its
    last segment has no ``/`` and contains characters a certificate's URI SAN cannot, and it is lengthened
    until no exact rule names it (TOML escapes can spell anything)."""
    identity = base + "(an officer no rule names)"
    while identity in exact:
        identity += "_"
    return identity


def _unnamed_officers(policy: ProductPolicy) -> list[str]:
    """One synthetic officer per group of officers the policy scopes without naming them one by one.

    For each trust domain a rule that can name officers mentions: an officer of that domain no exact rule
    names (``spiffe://TD/security-officer/<unnamed>``); for each pattern deeper than the role
    (``spiffe://TD/security-officer/team/*``): an officer under it. Without any such rule, an officer of a
    trust domain the policy never mentions, who gets ``default``.
    """
    exact = {rule.pattern for rule in policy.rules if not rule.is_prefix}
    bases: dict[str, None] = {}  # ordered, for stable messages
    for rule in policy.rules:
        if not rule.may_name_officers():
            continue
        segments = rule._segments()
        bases[f"{_SPIFFE}{segments[0]}/{_OFFICER_ROLE}/"] = None
        if rule.is_prefix and len(segments) > 2:
            bases[rule.pattern[:-1]] = None
    if not bases:
        bases[f"{_SPIFFE}(a trust domain no rule names)/{_OFFICER_ROLE}/"] = None
    return [_unnamed_identity(base, exact) for base in bases]


def require_officer_access(policy: ProductPolicy, officers_needed: int) -> None:
    """Refuse (``InvalidArgument``) a policy under which officers could no longer change the policy.

    A policy change is an act on ``SYSTEM_PRODUCT``: its requester and its ``officers_needed - 1``
    approvers must each act for every product (scope ``None``). The server cannot know which officer
    certificates exist, so this judges the text, by what the policy's own resolution (``scope_of``: exact
    rule first, then the longest pattern, then ``default``) gives two kinds of officers:

    - officers no exact rule names, one synthetic identity per group (``_unnamed_officers``: per trust domain
      the officer rules mention, and per pattern deeper than the role). If one of them gets every product,
      any number of officers can be issued certificates that act for every product;
    - officers named exactly, each counted if its own rule grants ``"*"``.

    The policy is accepted when at least ``officers_needed`` officers named exactly get every product, or
    when some group of unnamed officers does, unless the policy scopes at least ``officers_needed`` officers
    by name to listed products: such a policy reads as "the officers I know of are scoped", and counting on
    officers nobody named (who may hold no certificate) is exactly how such a text locks everyone out, so it
    must then name ``officers_needed`` officers who keep every product.

    Limits: the guard cannot tell whether the officers it counts on hold certificates, nor that they are
    still employed; a policy that scopes fewer named officers than ``officers_needed`` while the unnamed
    ones do not exist passes. ``kms policy reset`` (local, on a server host) is the way out of a lock-out
    the guard did not catch.
    """
    named = {r.pattern: r.products for r in policy.rules if not r.is_prefix and r.may_name_officers()}
    named_all = sorted(identity for identity, products in named.items() if products is None)
    named_scoped = sorted(identity for identity, products in named.items() if products is not None)
    if len(named_all) >= officers_needed:
        return
    unnamed = {identity: policy.scope_of(identity) for identity in _unnamed_officers(policy)}
    unnamed_all = any(scope is None for scope in unnamed.values())
    if unnamed_all and len(named_scoped) < officers_needed:
        return
    needs = (
        "the security officers out: a policy change needs "
        f"{officers_needed} officers (the requester and the approvers) who act for every product"
    )
    grants = (
        f"{len(named_all)} officer identit{'y' if len(named_all) == 1 else 'ies'} named exactly "
        f"act{'s' if len(named_all) == 1 else ''} for every product"
    )
    if unnamed_all:
        shown = ", ".join(named_scoped[:officers_needed])
        more = ", ..." if len(named_scoped) > officers_needed else ""
        raise InvalidArgument(
            f"the policy would lock {needs}; it scopes {len(named_scoped)} officers by name to listed "
            f'products ({shown}{more}) and only {grants}: the "*" it leaves to officers no rule names '
            f"counts on officers who may not exist. Name at least {officers_needed} officer identities "
            'with "*"'
        )
    scopes = "; ".join(
        f"{identity.rsplit('/', 1)[0]}/<unnamed> acts for {_describe(scope or ())}"
        for identity, scope in unnamed.items()
    )
    raise InvalidArgument(
        f"the policy would lock {needs}; under it {scopes}, and {grants}. Grant every product to the "
        'officers, e.g. "spiffe://TRUST_DOMAIN/security-officer/*" = "*" (a longer pattern or an exact '
        "identity overrides it)"
    )


# -- installed versions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredPolicy:
    """One version of the authorization policy: version 0 is the server's ``[policy]`` file (``text`` is
    empty without one: every identity unscoped); versions 1, 2, ... were installed under dual control."""

    version: int
    text: str
    created_at: datetime | None = None
    created_by: str = ""
    approval_id: str = ""

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.text.encode("utf-8")).digest()


class PolicyRepository(Protocol):
    """Installed policy versions and proposed texts (``kms.store.policy``)."""

    def latest_version(self) -> int:
        """The number of the newest installed version, 0 if none was installed (one cheap query)."""
        ...

    def latest(self) -> StoredPolicy | None: ...

    def version(self, number: int) -> StoredPolicy | None:
        """Installed version ``number`` (None if there is none)."""
        ...

    def add_draft(self, text: str, now: datetime, prune_before: datetime | None = None) -> bytes:
        """Keep a proposed text, dated ``now`` (proposing it again dates it anew); return its SHA-256, the
        name an approval request holds. Delete the drafts dated before ``prune_before`` in the same write."""
        ...

    def draft(self, sha256: bytes) -> str:
        """The proposed text with this SHA-256 (``NotFound`` if none)."""
        ...

    def install(self, policy: StoredPolicy) -> None:
        """Store ``policy`` as the newest version, only if it is ``latest_version() + 1`` at the time of the
        write (``FailedPrecondition`` otherwise: another change was installed meanwhile)."""
        ...
