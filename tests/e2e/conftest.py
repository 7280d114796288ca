"""Fixtures for end-to-end tests against a real server (SoftHSM2, SQLite, gRPC over mTLS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kms_server import KeySpec, RunningKms, running_kms

ALGORITHMS = {"p256": "ecdsa-p256", "p384": "ecdsa-p384", "rsa": "rsa3072-pss"}

# One product per (algorithm, number of signature blocks): products "p256-1" .. "rsa-3".
KEYS = [
    KeySpec(f"{alg}-{blocks}-slot{slot}", f"{alg}-{blocks}", name, slot)
    for alg, name in ALGORITHMS.items()
    for blocks in (1, 2, 3)
    for slot in range(blocks)
] + [
    KeySpec("artifacts-p256", "artifacts", "ecdsa-p256", None, "digest-signing"),
    KeySpec("fleet-sbv2-0", "fleet", "ecdsa-p256", 0),
]


# Products with manifest, KEK, registration and payload-seed keys (factory and distribution tests).
PRODUCT_SETS = ["fleet"]


@pytest.fixture(scope="session")
def kms_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    state: Path = tmp_path_factory.mktemp("kms-state")
    with running_kms(state, KEYS, product_sets=PRODUCT_SETS) as server:
        yield server
