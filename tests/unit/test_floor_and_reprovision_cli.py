"""``kmsctl floor`` and ``kmsctl devices reprovision``: what is checked before connecting (the commands
against the real server are in tests/e2e/test_floor_and_reprovisioning.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmsctl import cli

EXIT_USAGE = 2


@pytest.mark.parametrize(
    "command",
    [["floor", "show"], ["floor", "lower"], ["devices", "reprovision"]],
    ids=" ".join,
)
def test_the_officer_commands_default_to_the_officer_identity(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kmsctl {' '.join(command)}")
    assert "default --identity: security-officer" in out and "exit codes:" in out


@pytest.mark.parametrize("bad", ["-1", "4294967296", "two"])
def test_a_new_floor_outside_uint32_is_a_usage_error(
    bad: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["floor", "lower", "--product", "p", "--to", bad, "--state-dir", str(tmp_path)]
    assert cli.main(args) == EXIT_USAGE
    assert "--to" in capsys.readouterr().err


def test_reprovisioning_needs_a_reason(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert (
        cli.main(["devices", "reprovision", "24:6f:28:aa:bb:cc", "--state-dir", str(tmp_path)]) == EXIT_USAGE
    )
    assert "--reason" in capsys.readouterr().err
