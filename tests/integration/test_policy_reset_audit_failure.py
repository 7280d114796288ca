"""``kms policy reset`` (break glass) whose audit record cannot be written: the policy is installed and in
force, and the command says so with its own exit code (9) instead of failing blind, so that nobody runs it
again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import kms.server.app as app
from kms import cli
from kms.domain.errors import HsmUnavailable
from kms.store.database import Database
from kms.store.policy import SqlitePolicyRepository
from tests.support.kms_server import init_state


def test_a_reset_whose_audit_record_fails_says_the_policy_is_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    init_state(state, [])
    opened = app.open_components

    def audit_unreachable(config: Any) -> Any:
        components = opened(config)

        def append(event: object) -> None:
            raise HsmUnavailable("the audit key cannot be reached (test)")

        monkeypatch.setattr(components.audit_log, "append", append)
        return components

    monkeypatch.setattr(app, "open_components", audit_unreachable)
    code = cli.main(["policy", "reset", "--config", str(state / "kms.toml"), "--reason", "locked out"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INSTALLED_UNAUDITED == 9
    assert "version 1 IS installed and in force" in err and "do not run the reset again" in err
    with Database.open(state / "kms.db") as database:
        assert SqlitePolicyRepository(database).latest_version() == 1
