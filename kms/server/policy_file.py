"""The product policy file (``[policy] file`` in the server configuration), read once at startup.

Format (TOML)::

    default = "none"       # required: what an identity no rule names gets, "all" products or "none"

    [identities]           # identity or prefix pattern = list of products, or "*" for every product
    "spiffe://kms.example.com/build-server/ci-7" = ["thermostat"]
    "spiffe://kms.example.com/build-server/*" = ["thermostat", "doorbell"]
    "spiffe://kms.example.com/auditor/*" = "*"

An exact identity wins over a pattern; among patterns the longest prefix wins (``kms.domain.policy``). A
malformed file stops the server at startup with ``InvalidArgument`` naming the bad entry; it is never half
applied.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from kms.domain.errors import InvalidArgument
from kms.domain.policy import UNSCOPED, ProductPolicy, ScopeRule

_DEFAULTS = {"all": True, "none": False}


def parse_policy(doc: dict[str, Any]) -> ProductPolicy:
    """A policy from a decoded policy file; ``InvalidArgument`` names the bad key."""
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


def load_policy(path: Path | None) -> ProductPolicy:
    """The policy in ``path``; with no file, every identity acts for every product (``UNSCOPED``)."""
    if path is None:
        return UNSCOPED
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidArgument(f"cannot read policy file {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"policy file {path} is not valid TOML: {e}") from e
    return parse_policy(doc)
