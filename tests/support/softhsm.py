"""A throwaway SoftHSM2 token for tests, made by ``hsm/setup-softhsm.sh`` exactly as developers make theirs.

``create_softhsm_token(directory)`` runs the script, points ``SOFTHSM2_CONF`` at the new configuration (in
``os.environ``, which SoftHSM2 reads when the library is initialized, so before any ``Pkcs11Hsm.open()``)
and returns the token's URI and paths. It raises ``SoftHsmUnavailable`` with an installation hint when
SoftHSM2 is missing; the integration fixtures turn that into an immediate test failure, not a skip.

SoftHSM2 reads ``SOFTHSM2_CONF`` at ``C_Initialize`` only. ``Pkcs11Hsm.close()`` finalizes the library, so
a later ``open()`` sees a changed variable; one token per test session keeps things simple.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kms.hsm.config import HsmConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / "hsm" / "setup-softhsm.sh"
INSTALL_HINT = "install SoftHSM2 (Debian/Ubuntu: apt-get install softhsm2; Fedora: dnf install softhsm)"


class SoftHsmUnavailable(RuntimeError):
    """SoftHSM2 is not installed here, or the token could not be created."""


@dataclass(frozen=True)
class SoftHsmToken:
    """A SoftHSM2 token created for tests."""

    state_dir: Path
    conf_path: Path
    uri: str
    label: str

    @property
    def pin_path(self) -> Path:
        return self.state_dir / "hsm-pin"

    @property
    def tokens_dir(self) -> Path:
        return self.state_dir / "softhsm" / "tokens"

    @property
    def module_path(self) -> Path:
        return self.config().module_path

    def config(self) -> HsmConfig:
        return HsmConfig.from_uri(self.uri)


def create_softhsm_token(state_dir: Path, label: str = "kms-test") -> SoftHsmToken:
    """Create (or find, if the script ran there before) a token in ``state_dir``; set SOFTHSM2_CONF."""
    if shutil.which("softhsm2-util") is None:
        raise SoftHsmUnavailable(f"softhsm2-util is not on PATH; {INSTALL_HINT}")
    result = subprocess.run(
        ["bash", str(SETUP_SCRIPT), str(state_dir), label],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise SoftHsmUnavailable(f"hsm/setup-softhsm.sh failed: {result.stderr.strip()}; {INSTALL_HINT}")
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    try:
        conf_path, uri = Path(values["SOFTHSM2_CONF"]), values["PKCS11_URI"]
    except KeyError as e:
        raise SoftHsmUnavailable(f"hsm/setup-softhsm.sh printed no {e.args[0]}") from e
    os.environ["SOFTHSM2_CONF"] = str(conf_path)
    return SoftHsmToken(state_dir=Path(state_dir).resolve(), conf_path=conf_path, uri=uri, label=label)
