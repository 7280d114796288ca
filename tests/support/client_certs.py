"""Client certificates of any role for end-to-end tests, issued with the dev CA of a state directory.

``issue_client(state_dir, role, name)`` writes ``STATE/pki/clients/ROLE-NAME.{pem,key}`` with the identity
``spiffe://kms.dev/ROLE/NAME``, so ``RunningKms.credentials("ROLE-NAME")`` and
``tests.support.officers.officer_channel(server, "ROLE-NAME")`` use it. ``tests.support.officers`` does the
same for security officers only; this is for tests that need one identity per role (a product policy that
scopes each of them, say).
"""

from __future__ import annotations

from pathlib import Path

from kms.domain.identity import Role
from kms.server.pki import TRUST_DOMAIN, issue_dev_client


def client_identity(role: str, name: str) -> str:
    """The identity ``issue_client(.., role, name)`` certifies."""
    return f"spiffe://{TRUST_DOMAIN}/{role}/{name}"


def issue_client(state_dir: Path, role: str, name: str) -> str:
    """Issue a client certificate for ``role``/``name`` (unless one exists); return its file stem."""
    return issue_dev_client(state_dir / "pki", Role(role), name)
