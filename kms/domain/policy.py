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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from kms.domain.errors import InvalidArgument, PermissionDenied
from kms.domain.identity import Caller
from kms.domain.keys import validate_product

_SPIFFE = "spiffe://"


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

    @property
    def is_prefix(self) -> bool:
        return self.pattern.endswith("/*")

    def matches(self, identity: str) -> bool:
        if self.is_prefix:
            return identity.startswith(self.pattern[:-1])
        return identity == self.pattern


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
    return caller.products is None or product in caller.products


def require_product(caller: Caller, product: str) -> None:
    """Refuse (``PermissionDenied``, naming the product) unless ``caller`` may act for ``product``."""
    if not in_scope(caller, product):
        raise PermissionDenied(
            f"{caller.identity} may not act for product {product!r} "
            f"(its product scope: {_describe(caller.products or ())})"
        )


def _describe(products: Iterable[str]) -> str:
    names = sorted(products)
    return ", ".join(repr(p) for p in names) if names else "no product"
