"""The product policy file (``[policy] file`` in the server configuration): version 0 of the policy.

Format (TOML)::

    default = "none"       # required: what an identity no rule names gets, "all" products or "none"

    [identities]           # identity or prefix pattern = list of products, or "*" for every product
    "spiffe://kms.example.com/build-server/ci-7" = ["thermostat"]
    "spiffe://kms.example.com/build-server/*" = ["thermostat", "doorbell"]
    "spiffe://kms.example.com/auditor/*" = "*"

An exact identity wins over a pattern; among patterns the longest prefix wins (``kms.domain.policy``, which
also parses the text). The file is read when the server starts, and a malformed file stops it with
``InvalidArgument`` naming the bad entry; it is never half applied. It is the policy in force until officers
install a version under dual control (``kms.service.policy``); from then on the newest installed version
applies and the file is no longer read for authorization.
"""

from __future__ import annotations

from pathlib import Path

from kms.domain.errors import InvalidArgument
from kms.domain.policy import UNSCOPED, ProductPolicy, parse_policy, parse_policy_text

__all__ = ["load_policy", "parse_policy", "read_policy_file"]


def read_policy_file(path: Path | None) -> str:
    """The text of the policy file at ``path``, checked to parse; "" without a file (every identity
    unscoped). ``InvalidArgument`` names the file and what is wrong."""
    if path is None:
        return ""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise InvalidArgument(f"cannot read policy file {path}: {reason}") from e
    parse_policy_text(text, f"policy file {path}")
    return text


def load_policy(path: Path | None) -> ProductPolicy:
    """The policy in ``path``; with no file, every identity acts for every product (``UNSCOPED``)."""
    if path is None:
        return UNSCOPED
    return parse_policy_text(read_policy_file(path), f"policy file {path}")
