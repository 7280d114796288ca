"""The officer's ``kmsctl keys`` commands and ``KeyAdminClient``, against the real servicer on a fake HSM
(tests/support/fake_admin.py) over mutual TLS with the development PKI.

``kmsctl.cli.main`` runs in-process. Until ``cli.build_parser`` registers the commands itself, the
``admin_commands`` fixture adds them the way it will (``add_key_admin_commands``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from kms.domain.keys import Algorithm as ServerAlgorithm
from kms.domain.keys import KeyPurpose as ServerPurpose
from kmsapi.v1 import admin_pb2, admin_pb2_grpc, common_pb2
from kmsctl import KmsClient, NotFoundError, RetryPolicy, UnavailableError
from kmsctl import cli as kmsctl_cli
from kmsctl._admin import PURPOSES, KeyAdminClient, TransitionEvent
from kmsctl._admin_cli import _ALGORITHMS, _PURPOSES, _duration, add_key_admin_commands
from kmsctl._models import KeyVersionState
from kmsctl.errors import InvalidArgumentError
from tests.support import fake_admin
from tests.support.fake_admin import OFFICER, T0, RunningAdmin

COMMANDS = [
    "create",
    "create-product-set",
    "rotate",
    "disable",
    "enable",
    "set-primary",
    "schedule-destroy",
    "cancel-destroy",
    "set-rotation",
    "history",
]


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.fixture(autouse=True)
def admin_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRPC_VERBOSITY", "ERROR")  # main() would otherwise set it for this process
    original = kmsctl_cli.build_parser

    def build_parser() -> argparse.ArgumentParser:
        parser = original()
        key_commands = _subcommands(_subcommands(parser).choices["keys"])
        if "rotate" not in key_commands.choices:  # not registered by cli.py (yet)
            parents = [kmsctl_cli._connection_options(), kmsctl_cli._output_options()]
            add_key_admin_commands(key_commands, parents)
        return parser

    monkeypatch.setattr(kmsctl_cli, "build_parser", build_parser)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningAdmin]:
    running = fake_admin.start(tmp_path / ".kms")
    yield running
    running.stop()


class Kmsctl:
    def __init__(self, served: RunningAdmin, capsys: pytest.CaptureFixture[str]) -> None:
        self.served = served
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        connection = [
            "--server",
            self.served.target,
            "--state-dir",
            str(self.served.state_dir),
            "--retries",
            "1",
        ]
        self.capsys.readouterr()
        code = kmsctl_cli.main(["keys", *args, *connection])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> tuple[int, Any]:
        code, out, _err = self(*args, "--json")
        return code, json.loads(out)


@pytest.fixture
def kmsctl(served: RunningAdmin, capsys: pytest.CaptureFixture[str]) -> Kmsctl:
    return Kmsctl(served, capsys)


@pytest.fixture
def officer(served: RunningAdmin) -> Iterator[KeyAdminClient]:
    pki = served.state_dir / "pki"
    with KmsClient.from_files(
        served.target,
        ca=pki / "ca.pem",
        cert=pki / "clients" / "security-officer.pem",
        key=pki / "clients" / "security-officer.key",
        timeout=10,
        retries=RetryPolicy(max_attempts=2, initial_backoff=0.01),
    ) as kms:
        yield KeyAdminClient(kms)


def create_fw(kmsctl: Kmsctl) -> dict[str, Any]:
    code, key = kmsctl.json(
        "create",
        "--key-id",
        "fw",
        "--product",
        "artifacts",
        "--purpose",
        "digest-signing",
        "--algorithm",
        "ecdsa-p256",
    )
    assert code == 0, key
    return key  # type: ignore[no-any-return]


def states(key: dict[str, Any]) -> dict[str, str]:
    return {v["name"].rpartition("/")[2]: v["state"] for v in key["versions"]}


# -- parser ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_the_officer_identity_and_the_exit_codes(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kmsctl_cli.main(["keys", command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kmsctl keys {command}")
    assert "--server HOST:PORT" in out and "--json" in out
    assert "default --identity: security-officer" in out
    assert "exit codes:" in out and "5  failed precondition" in out


@pytest.mark.parametrize(
    "args",
    [
        ["create", "--key-id", "k", "--product", "p", "--algorithm", "ecdsa-p256", "--slot", "3"],
        ["create", "--key-id", "k", "--product", "p", "--algorithm", "dsa"],
        ["schedule-destroy", "k/versions/1", "--delay", "soon"],
        ["set-rotation", "k"],
        ["set-rotation", "k", "--period", "1d", "--clear"],
        ["set-rotation", "k", "--period", "30d", "--first-rotation", "2026-01-01T00:00:00"],
        ["rotate"],
    ],
)
def test_usage_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert kmsctl_cli.main(["keys", *args]) == 2
    assert "usage: kmsctl keys" in capsys.readouterr().err


def test_durations() -> None:
    assert _duration("3600") == timedelta(hours=1)
    assert _duration("90m") == timedelta(minutes=90)
    assert _duration("24h") == timedelta(days=1)
    assert _duration("30D") == timedelta(days=30)
    for bad in ("", "1.5h", "-1h", "1w", "h"):
        with pytest.raises(argparse.ArgumentTypeError):
            _duration(bad)


def test_cli_choices_are_what_client_and_server_know() -> None:
    assert set(_PURPOSES) == set(PURPOSES) == {p.value for p in ServerPurpose}
    assert set(_ALGORITHMS) == {a.value for a in ServerAlgorithm}
    assert set(PURPOSES.values()) == set(common_pb2.KeyPurpose.values()) - {
        common_pb2.KEY_PURPOSE_UNSPECIFIED
    }


# -- creating keys -----------------------------------------------------------------------------------------


def test_create_uses_the_officer_certificate_and_records_the_creation(kmsctl: Kmsctl) -> None:
    code, out, err = kmsctl(
        "create",
        "--key-id",
        "fw",
        "--product",
        "artifacts",
        "--purpose",
        "digest-signing",
        "--algorithm",
        "ecdsa-p256",
    )
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "created keys/fw"
    for expected in (
        "product         artifacts",
        "purpose         digest-signing",
        "version 1       enabled, primary",
    ):
        assert expected in out

    code, history = kmsctl.json("history", "fw")
    assert code == 0
    assert [(t["event"], t["actor"]) for t in history["transitions"]] == [
        ("created", OFFICER),
        ("made-primary", OFFICER),
    ]


def test_create_json_and_refusals(kmsctl: Kmsctl) -> None:
    key = create_fw(kmsctl)
    assert key["name"] == "keys/fw" and key["product"] == "artifacts"
    assert (key["purpose"], key["algorithm"], key["sbv2_slot"]) == ("digest-signing", "ecdsa-p256", None)
    assert key["primary_version"] == "keys/fw/versions/1"
    assert key["versions"] == [
        {
            "name": "keys/fw/versions/1",
            "state": "enabled",
            "create_time": T0.isoformat(),
            "destroy_time": None,
        }
    ]
    assert (key["rotation_period_seconds"], key["next_rotation_time"]) == (None, None)

    code, error = kmsctl.json(
        "create",
        "--key-id",
        "fw",
        "--product",
        "artifacts",
        "--purpose",
        "digest-signing",
        "--algorithm",
        "ecdsa-p256",
    )
    assert code == 5 and error["error"]["code"] == "ALREADY_EXISTS" and "keys/fw" in error["error"]["message"]

    code, error = kmsctl.json(
        "create", "--key-id", "sb", "--product", "artifacts", "--algorithm", "ecdsa-p256"
    )
    assert code == 3 and "slot" in error["error"]["message"], "a Secure Boot V2 key needs a slot"

    code, error = kmsctl.json(
        "create",
        "--key-id",
        "kek",
        "--product",
        "artifacts",
        "--purpose",
        "key-encryption",
        "--algorithm",
        "ecdsa-p256",
    )
    assert code == 3 and "aes256" in error["error"]["message"]

    code, key = kmsctl.json(
        "create", "--key-id", "sb0", "--product", "artifacts", "--algorithm", "rsa3072-pss", "--slot", "0"
    )
    assert code == 0 and (key["purpose"], key["sbv2_slot"]) == ("secure-boot-v2", 0)


def test_create_is_not_retried_on_unavailable(kmsctl: Kmsctl, served: RunningAdmin) -> None:
    served.interceptor.failures["CreateKey"] = 1
    code, _out, err = kmsctl(
        "create",
        "--key-id",
        "fw",
        "--product",
        "artifacts",
        "--purpose",
        "digest-signing",
        "--algorithm",
        "ecdsa-p256",
    )
    assert code == 7 and "restarting" in err
    assert served.interceptor.calls["CreateKey"] == 1


def test_create_product_set_is_repeatable(kmsctl: Kmsctl, served: RunningAdmin) -> None:
    served.hsm.fail_generate = 0
    code, result = kmsctl.json("create-product-set", "--product", "fleet")
    assert code == 0
    assert [(k["name"], k["purpose"], k["algorithm"]) for k in result["created"]] == [
        ("keys/fleet-manifest", "ota-manifest", "ecdsa-p256"),
        ("keys/fleet-kek", "key-encryption", "aes256"),
        ("keys/fleet-registration", "registration-transport", "rsa3072-oaep"),
        ("keys/fleet-payload-seed", "payload-seed", "hmac-sha256"),
    ]
    assert result["existing"] == []
    code, history = kmsctl.json("history", "fleet-kek")
    assert [t["actor"] for t in history["transitions"]] == [OFFICER, OFFICER]

    code, out, _err = kmsctl("create-product-set", "--product", "fleet")
    assert code == 0
    assert out.splitlines() == [
        "product fleet has every key of the set already; nothing created",
        "kept keys/fleet-manifest (exists already)",
        "kept keys/fleet-kek (exists already)",
        "kept keys/fleet-registration (exists already)",
        "kept keys/fleet-payload-seed (exists already)",
    ]
    assert served.hsm.generated == 4


def test_create_product_set_after_a_failure_creates_the_rest(kmsctl: Kmsctl, served: RunningAdmin) -> None:
    code, _ = kmsctl.json(
        "create",
        "--key-id",
        "fleet-manifest",
        "--product",
        "fleet",
        "--purpose",
        "ota-manifest",
        "--algorithm",
        "ecdsa-p256",
    )
    assert code == 0
    served.hsm.fail_generate = 1  # the KEK's generation fails (the manifest key exists)
    code, error = kmsctl.json("create-product-set", "--product", "fleet")
    assert code == 7 and error["error"]["code"] == "UNAVAILABLE"
    assert served.interceptor.calls["CreateProductKeySet"] == 1, "not retried: it is not idempotent"
    code, result = kmsctl.json("create-product-set", "--product", "fleet")
    assert code == 0
    assert [k["name"] for k in result["created"]] == [
        "keys/fleet-kek",
        "keys/fleet-registration",
        "keys/fleet-payload-seed",
    ]
    assert result["existing"] == ["keys/fleet-manifest"]


# -- lifecycle ---------------------------------------------------------------------------------------------


def test_rotate(kmsctl: Kmsctl, served: RunningAdmin) -> None:
    create_fw(kmsctl)
    served.clock.now = T0 + timedelta(days=1)
    code, out, _err = kmsctl("rotate", "keys/fw")
    assert code == 0
    assert out.splitlines()[0] == "rotated keys/fw: keys/fw/versions/2 is new and signs new work"
    assert "version 1       enabled\n" in out and "version 2       enabled, primary" in out
    assert served.changed == ["fw"], "the signing cache is told at once"

    code, result = kmsctl.json("rotate", "fw")
    assert code == 0 and result["key_version"] == "keys/fw/versions/3"
    assert result["key"]["primary_version"] == "keys/fw/versions/3"
    assert states(result["key"]) == {"1": "enabled", "2": "enabled", "3": "enabled"}


def test_rotate_is_not_retried_and_refusals_exit_with_their_codes(
    kmsctl: Kmsctl, served: RunningAdmin
) -> None:
    create_fw(kmsctl)
    served.interceptor.failures["RotateKey"] = 1
    code, error = kmsctl.json("rotate", "fw")
    assert code == 7 and error["error"]["code"] == "UNAVAILABLE"
    assert served.interceptor.calls["RotateKey"] == 1

    code, error = kmsctl.json("rotate", "nope")
    assert code == 4 and error == {
        "error": {"code": "NOT_FOUND", "message": "key keys/nope does not exist", "exit_code": 4}
    }
    code, error = kmsctl.json("rotate", "fw/versions/1")
    assert code == 3 and "names a key version" in error["error"]["message"]


def test_disable_enable_and_set_primary(kmsctl: Kmsctl, served: RunningAdmin) -> None:
    create_fw(kmsctl)
    assert kmsctl.json("rotate", "fw")[0] == 0

    code, out, err = kmsctl("disable", "fw/versions/2")
    assert code == 5 and out == ""
    assert "primary version" in err and "new primary" in err

    code, key = kmsctl.json("disable", "fw/versions/2", "--new-primary", "1")
    assert code == 0
    assert states(key) == {"1": "enabled", "2": "disabled"} and key["primary_version"] == "keys/fw/versions/1"

    code, out, _err = kmsctl("disable", "keys/fw/versions/2")
    assert code == 0 and out.startswith("disabled keys/fw/versions/2: it no longer signs"), "idempotent"

    code, key = kmsctl.json("enable", "fw/versions/2")
    assert code == 0 and states(key) == {"1": "enabled", "2": "enabled"}
    assert key["primary_version"] == "keys/fw/versions/1"

    code, out, _err = kmsctl("set-primary", "fw/versions/2")
    assert code == 0 and out.splitlines()[0] == "keys/fw/versions/2 is the primary version of keys/fw"

    code, key = kmsctl.json("disable", "fw/versions/1")
    assert code == 0 and states(key) == {"1": "disabled", "2": "enabled"}
    code, error = kmsctl.json("set-primary", "fw/versions/1")
    assert code == 5 and "only an enabled version" in error["error"]["message"]

    code, error = kmsctl.json("disable", "fw/versions/9")
    assert code == 4
    code, error = kmsctl.json("disable", "fw")
    assert code == 3 and "a key version is needed" in error["error"]["message"]


def test_idempotent_calls_are_retried_on_unavailable(kmsctl: Kmsctl, served: RunningAdmin) -> None:
    create_fw(kmsctl)
    assert kmsctl.json("rotate", "fw")[0] == 0
    served.interceptor.failures["UpdateKeyVersionState"] = 1
    code, key = kmsctl.json("disable", "fw/versions/1")
    assert code == 0 and states(key)["1"] == "disabled"
    assert served.interceptor.calls["UpdateKeyVersionState"] == 2


def test_schedule_and_cancel_destruction(kmsctl: Kmsctl) -> None:
    create_fw(kmsctl)
    assert kmsctl.json("rotate", "fw")[0] == 0

    code, out, _err = kmsctl("schedule-destroy", "fw/versions/1", "--delay", "2h")
    due = (T0 + timedelta(hours=2)).isoformat()
    assert code == 0
    assert out.splitlines()[0] == (
        f"scheduled the destruction of keys/fw/versions/1 at {due}; until then "
        "`kmsctl keys cancel-destroy keys/fw/versions/1` cancels it"
    )
    assert f"version 1       destroy-scheduled, destroyed at {due}" in out

    code, key = kmsctl.json("schedule-destroy", "fw/versions/1", "--delay", "5h")
    assert code == 0 and key["versions"][0]["destroy_time"] == due, (
        "a repeated scheduling keeps the first time"
    )

    code, error = kmsctl.json("enable", "fw/versions/1")
    assert code == 5 and "cancel the destruction first" in error["error"]["message"]

    code, out, _err = kmsctl("cancel-destroy", "fw/versions/1")
    assert code == 0 and out.startswith("cancelled the destruction of keys/fw/versions/1; it is disabled")
    code, key = kmsctl.json("cancel-destroy", "fw/versions/1")
    assert code == 5 and "only a version scheduled for destruction" in key["error"]["message"]

    code, key = kmsctl.json("schedule-destroy", "fw/versions/2", "--new-primary", "keys/fw/versions/1")
    assert code == 5, "version 1 is disabled, so it cannot become primary"
    code, key = kmsctl.json("schedule-destroy", "fw/versions/2")
    assert code == 0, "the only enabled version may go"
    assert key["versions"][1]["destroy_time"] == (T0 + timedelta(hours=24)).isoformat(), "the default delay"

    code, error = kmsctl.json("schedule-destroy", "fw/versions/1", "--delay", "10m")
    assert code == 3 and "between 1:00:00 and 120 days" in error["error"]["message"]


def test_rotation_schedule(kmsctl: Kmsctl) -> None:
    create_fw(kmsctl)
    code, out, _err = kmsctl("set-rotation", "fw", "--period", "30d")
    assert code == 0
    next_time = (T0 + timedelta(days=30)).isoformat()
    assert out.splitlines()[0] == "keys/fw is rotated every 30d"
    assert f"rotation        every 30d, next at {next_time}" in out

    code, key = kmsctl.json(
        "set-rotation", "fw", "--period", "90d", "--first-rotation", "2025-04-01T00:00:00Z"
    )
    assert code == 0 and key["rotation_period_seconds"] == 90 * 86400
    assert key["next_rotation_time"] == "2025-04-01T00:00:00+00:00"

    code, key = kmsctl.json("set-rotation", "fw", "--clear")
    assert code == 0 and (key["rotation_period_seconds"], key["next_rotation_time"]) == (None, None)

    code, error = kmsctl.json("set-rotation", "fw", "--period", "3600")
    assert code == 3 and "rotation period" in error["error"]["message"]

    code, _ = kmsctl.json(
        "create", "--key-id", "sb0", "--product", "artifacts", "--algorithm", "ecdsa-p256", "--slot", "0"
    )
    code, error = kmsctl.json("set-rotation", "sb0", "--period", "30d")
    assert code == 5 and "Secure Boot V2" in error["error"]["message"]


def test_history_table_and_json(kmsctl: Kmsctl, served: RunningAdmin) -> None:
    create_fw(kmsctl)
    served.clock.now = T0 + timedelta(hours=1)
    assert kmsctl.json("rotate", "fw")[0] == 0
    assert kmsctl.json("disable", "fw/versions/1")[0] == 0
    assert kmsctl.json("schedule-destroy", "fw/versions/1", "--delay", "1h")[0] == 0

    code, out, _err = kmsctl("history", "fw", "-q")
    assert code == 0
    t0, t1, due = T0.isoformat(), (T0 + timedelta(hours=1)).isoformat(), (T0 + timedelta(hours=2)).isoformat()
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["TIME", "VERSION", "EVENT", "FROM", "TO", "ACTOR"]
    assert lines[1:] == [
        [t0, "1", "created", "-", "enabled", OFFICER],
        [t0, "1", "made-primary", "enabled", "enabled", OFFICER],
        [t1, "2", "created", "-", "enabled", OFFICER],
        [t1, "2", "made-primary", "enabled", "enabled", OFFICER],
        [t1, "1", "disabled", "enabled", "disabled", OFFICER],
        [t1, "1", "destroy-scheduled", "(due", f"{due})", "disabled", "destroy-scheduled", OFFICER],
    ]

    code, data = kmsctl.json("history", "fw/versions/2")
    assert code == 0
    assert data["transitions"] == [
        {
            "key_version": "keys/fw/versions/2",
            "event": "created",
            "from_state": None,
            "to_state": "enabled",
            "actor": OFFICER,
            "time": t1,
            "destroy_time": None,
        },
        {
            "key_version": "keys/fw/versions/2",
            "event": "made-primary",
            "from_state": "enabled",
            "to_state": "enabled",
            "actor": OFFICER,
            "time": t1,
            "destroy_time": None,
        },
    ]
    assert kmsctl.json("history", "ghost")[0] == 4


def test_another_identity_is_used_when_asked(kmsctl: Kmsctl) -> None:
    """The fake has no authorization interceptor, so the call goes through, recorded under that identity."""
    code, _ = kmsctl.json(
        "create",
        "--key-id",
        "fw",
        "--product",
        "a",
        "--purpose",
        "digest-signing",
        "--algorithm",
        "ecdsa-p256",
        "--identity",
        "auditor",
    )
    assert code == 0
    code, history = kmsctl.json("history", "fw")
    assert {t["actor"] for t in history["transitions"]} == {"spiffe://kms.dev/auditor/dev"}


# -- the library -------------------------------------------------------------------------------------------


def test_client_values(officer: KeyAdminClient, served: RunningAdmin) -> None:
    key = officer.create_key("artifacts", "fw", "digest-signing", "ecdsa-p384")
    assert (key.name, key.purpose, key.algorithm, key.sbv2_slot) == (
        "keys/fw",
        "digest-signing",
        "ecdsa-p384",
        None,
    )
    assert key.version("keys/fw/versions/1").state is KeyVersionState.ENABLED
    rotated = officer.rotate_key("keys/fw")
    assert rotated.key_version == "keys/fw/versions/2" and rotated.key.primary_version == rotated.key_version
    scheduled = officer.schedule_destruction("keys/fw/versions/1", delay=timedelta(hours=3))
    assert scheduled.version("keys/fw/versions/1").destroy_time == T0 + timedelta(hours=3)
    assert scheduled.version("keys/fw/versions/1").state is KeyVersionState.DESTROY_SCHEDULED
    first = datetime(2026, 1, 1, tzinfo=UTC)
    ruled = officer.set_rotation_schedule("keys/fw", timedelta(days=7), first_rotation=first)
    assert (ruled.rotation_period, ruled.next_rotation_time) == (timedelta(days=7), first)
    events = officer.list_transitions("keys/fw/versions/1")
    assert [e.event for e in events] == [
        TransitionEvent.CREATED,
        TransitionEvent.MADE_PRIMARY,
        TransitionEvent.DESTROY_SCHEDULED,
    ]
    assert events[0].from_state is None and events[2].from_state is KeyVersionState.ENABLED
    assert events[2].destroy_time == T0 + timedelta(hours=3)
    with pytest.raises(NotFoundError):
        officer.cancel_destruction("keys/ghost/versions/1")


def test_client_checks_before_calling(officer: KeyAdminClient, served: RunningAdmin) -> None:
    with pytest.raises(InvalidArgumentError, match="whole"):
        officer.schedule_destruction("keys/fw/versions/1", delay=timedelta(hours=1, microseconds=5))
    with pytest.raises(InvalidArgumentError, match="time zone"):
        officer.set_rotation_schedule("keys/fw", timedelta(days=7), first_rotation=datetime(2026, 1, 1))
    with pytest.raises(InvalidArgumentError, match="needs a period"):
        officer.set_rotation_schedule("keys/fw", None, first_rotation=datetime(2026, 1, 1, tzinfo=UTC))
    with pytest.raises(InvalidArgumentError, match="unknown purpose"):
        officer.create_key("a", "k", "signing", "ecdsa-p256")  # type: ignore[arg-type]
    assert sum(served.interceptor.calls.values()) == 0


def test_client_unavailable_after_retries(officer: KeyAdminClient, served: RunningAdmin) -> None:
    served.interceptor.failures["ListKeyTransitions"] = 5
    with pytest.raises(UnavailableError, match="after 2 attempts"):
        officer.list_transitions("keys/fw")


# -- the servicer's parsing (requests the client library never sends) ---------------------------------------


def _status(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=10)
    error = raised.value
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


def test_servicer_refuses_malformed_requests(officer: KeyAdminClient) -> None:
    officer.create_key("artifacts", "fw", "digest-signing", "ecdsa-p256")
    officer.create_key("artifacts", "other", "digest-signing", "ecdsa-p256")
    stub = admin_pb2_grpc.KeyAdminServiceStub(officer._kms._channel)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[Any, Any, str]] = [
        (
            stub.CreateKey,
            admin_pb2.CreateKeyRequest(product="a", key_id="k", algorithm="ecdsa-p256"),
            "purpose",
        ),
        (
            stub.CreateKey,
            admin_pb2.CreateKeyRequest(
                product="a", key_id="k", purpose=common_pb2.DIGEST_SIGNING, algorithm="p256"
            ),
            "unknown algorithm",
        ),
        (
            stub.UpdateKeyVersionState,
            admin_pb2.UpdateKeyVersionStateRequest(name="keys/fw/versions/1", state=common_pb2.DESTROYED),
            "ScheduleKeyVersionDestruction",
        ),
        (
            stub.UpdateKeyVersionState,
            admin_pb2.UpdateKeyVersionStateRequest(
                name="keys/fw/versions/1",
                state=common_pb2.DISABLED,
                new_primary_version="keys/other/versions/1",
            ),
            "same key",
        ),
        (
            stub.ScheduleKeyVersionDestruction,
            admin_pb2.ScheduleKeyVersionDestructionRequest(
                name="keys/fw/versions/1", delay_seconds=2**64 - 1
            ),
            "out of range",
        ),
        (
            stub.SetRotationSchedule,
            admin_pb2.SetRotationScheduleRequest(name="keys/fw", period_seconds=2**63),
            "out of range",
        ),
        (
            stub.SetRotationSchedule,
            admin_pb2.SetRotationScheduleRequest(name="keys/fw/versions/1"),
            "names a key version",
        ),
        (stub.ListKeyTransitions, admin_pb2.ListKeyTransitionsRequest(name="fw"), "malformed key name"),
    ]
    for call, request, message in cases:
        code, details = _status(call, request)
        assert (code, message in details) == (invalid, True), (request, details)
