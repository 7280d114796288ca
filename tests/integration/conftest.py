"""Fixtures for tests against a real PKCS#11 module: a fresh SoftHSM2 token per test session.

``softhsm_token`` creates the token with ``hsm/setup-softhsm.sh`` (and sets ``SOFTHSM2_CONF``); a machine
without SoftHSM2 fails these tests at once with an installation hint rather than skipping them silently.
``hsm`` is an opened ``Pkcs11Hsm`` on that token, closed after the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.hsm.pkcs11_hsm import Pkcs11Hsm
from tests.support.softhsm import SoftHsmToken, SoftHsmUnavailable, create_softhsm_token


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    state_dir: Path = tmp_path_factory.mktemp("softhsm")
    try:
        return create_softhsm_token(state_dir)
    except SoftHsmUnavailable as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def hsm(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11Hsm]:
    adapter = Pkcs11Hsm(softhsm_token.config())
    adapter.open()
    try:
        yield adapter
    finally:
        adapter.close()
