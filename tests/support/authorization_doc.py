"""The role table of docs/authorization.md ("Who may call what"), read as data.

The document is the specification of who may call what; ``tests/unit/test_authorization_doc.py`` checks that
``METHOD_ROLES`` (``kms.server.auth``) enforces exactly it. End-to-end tests take their role expectations
from here, so a change to ``METHOD_ROLES`` alone shows against the running server too.
"""

from __future__ import annotations

from pathlib import Path

from kms.domain.identity import Role

DOC = Path(__file__).resolve().parents[2] / "docs" / "authorization.md"


def documented_roles(doc: Path = DOC) -> dict[str, frozenset[Role]]:
    """Method path -> the roles the table marks "yes" (columns in ``Role`` order, checked)."""
    rows = [line for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert header[1:] == [role.value for role in Role], f"unexpected role columns in {doc}: {header}"
    table: dict[str, frozenset[Role]] = {}
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        method = cells[0].strip("`")
        assert method not in table, f"{method} appears twice in {doc}"
        table[method] = frozenset(role for role, cell in zip(Role, cells[1:], strict=True) if cell == "yes")
    return table
