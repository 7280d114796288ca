"""docs/authorization.md is the authorization matrix; it must say exactly what METHOD_ROLES enforces."""

from __future__ import annotations

from pathlib import Path

from kms.domain.identity import Role
from kms.server.auth import METHOD_ROLES

DOC = Path(__file__).resolve().parents[2] / "docs" / "authorization.md"


def test_the_documented_matrix_is_the_enforced_one() -> None:
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[1:] == [role.value for role in Role]
    documented: dict[str, frozenset[Role]] = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        method = cells[0].strip("`")
        documented[method] = frozenset(
            role for role, cell in zip(Role, cells[1:], strict=True) if cell == "yes"
        )
    assert documented == METHOD_ROLES
