"""``kmsctl keys rollover``'s client-side check of a chain (``_rollover_cli.check_chain``), on the FKRS
vectors, and its registration in the CLI. The command against a real server:
tests/e2e/test_manifest_key_rollover.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kmsctl import cli
from kmsctl._rollover_cli import RolloverChainInfo, RolloverStatementInfo, check_chain
from kmsctl.errors import IntegrityError

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "rollover"
DOC: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text())
KEY = "keys/thermostat-manifest"


def _id(name: str) -> bytes:
    return bytes.fromhex(DOC["keys"][name]["key_id"])


def _info(name: str) -> RolloverStatementInfo:
    vector = next(v for v in DOC["valid"] if v["name"] == name)
    return RolloverStatementInfo(
        statement=bytes.fromhex(vector["statement"]),
        from_version=f"{KEY}/versions/{vector['from_version']}",
        to_version=f"{KEY}/versions/{vector['to_version']}",
        from_key_id=_id(vector["from_key"]),
        to_key_id=_id(vector["to_key"]),
        create_time=None,
    )


def _chain(*statements: RolloverStatementInfo, current: str = "v3") -> RolloverChainInfo:
    return RolloverChainInfo("thermostat", _id("v1"), statements, f"{KEY}/versions/3", _id(current), False)


GOOD = _chain(_info("v1-to-v2"), _info("v2-to-v3"))
V1_DER = bytes.fromhex(DOC["keys"]["v1"]["spki"])
ATTACKER_DER = bytes.fromhex(DOC["keys"]["attacker"]["spki"])


def _flip_last(info: RolloverStatementInfo) -> RolloverStatementInfo:
    return replace(info, statement=info.statement[:-1] + bytes([info.statement[-1] ^ 1]))


def test_a_good_chain_passes_with_or_without_the_trusted_key() -> None:
    check_chain(GOOD)
    check_chain(GOOD, V1_DER)
    check_chain(_chain(current="v1"))  # nothing to apply: the device trusts the current key


def test_every_signature_after_the_first_is_checked() -> None:
    first, second = GOOD.statements
    with pytest.raises(IntegrityError, match=r"statement 1 .* bad_signature"):
        check_chain(_chain(first, _flip_last(second)))


def test_the_first_signature_needs_the_trusted_key() -> None:
    first, second = GOOD.statements
    forged = _chain(_flip_last(first), second)
    check_chain(forged)  # documented: with an id only, the device alone can check the first signature
    with pytest.raises(IntegrityError, match=r"statement 0 .* bad_signature"):
        check_chain(forged, V1_DER)
    with pytest.raises(IntegrityError, match="SHA-256 is not the trusted key id"):
        check_chain(GOOD, ATTACKER_DER)


def test_links_descriptions_and_the_end_are_checked() -> None:
    first, second = GOOD.statements
    with pytest.raises(IntegrityError, match="does not link"):
        check_chain(_chain(second))
    with pytest.raises(IntegrityError, match="does not link"):
        check_chain(_chain(first, first))
    with pytest.raises(IntegrityError, match="differ from the server's description"):
        check_chain(_chain(first, replace(second, to_version=f"{KEY}/versions/4")))
    with pytest.raises(IntegrityError, match="differ from the server's description"):
        check_chain(_chain(replace(first, to_key_id=_id("v3")), second))
    with pytest.raises(IntegrityError, match="ends at key id"):
        check_chain(_chain(first))
    with pytest.raises(IntegrityError, match="malformed"):
        check_chain(_chain(replace(first, statement=first.statement + b"\x00"), second))
    with pytest.raises(IntegrityError, match="for product"):
        check_chain(replace(GOOD, product="doorbell"))


def test_the_command_is_registered_with_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["keys", "rollover", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--product", "--trusted-key-id", "--trusted-key", "--output", "distribution-server"):
        assert option in help_text
    assert cli.main(["keys", "rollover", "--product", "p", "-o", "x"]) == cli.EXIT_USAGE
    args = [
        "keys",
        "rollover",
        "--product",
        "p",
        "--trusted-key-id",
        "00",
        "--trusted-key",
        "k.pem",
        "-o",
        "x",
    ]
    assert cli.main(args) == cli.EXIT_USAGE, "one trusted key, by id or as PEM"
