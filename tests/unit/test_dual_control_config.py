"""The ``[dual_control]`` section of the server configuration (``kms.server.config``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms.domain.errors import InvalidArgument
from kms.server.config import DualControlConfig, load_config

MINIMAL = """
[tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
[hsm]
uri = "pkcs11:token=t?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:PIN"
"""


def _load(tmp_path: Path, extra: str = "") -> DualControlConfig:
    path = tmp_path / "kms.toml"
    path.write_text(MINIMAL + extra)
    return load_config(path).dual_control


def test_defaults_are_two_approvals_within_a_day(tmp_path: Path) -> None:
    assert _load(tmp_path) == DualControlConfig(required_approvals=2, ttl_seconds=86400)


def test_values_are_read(tmp_path: Path) -> None:
    loaded = _load(tmp_path, "[dual_control]\nrequired_approvals = 3\nttl_seconds = 600\n")
    assert loaded == DualControlConfig(required_approvals=3, ttl_seconds=600)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("required_approvals = 0", "must be positive"),
        ("ttl_seconds = -1", "must be positive"),
        ("required_approvals = '2'", "must be a int"),
        ("ttl = 5", "unknown key"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _load(tmp_path, f"[dual_control]\n{text}\n")
