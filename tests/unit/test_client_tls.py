"""The client over mutual TLS against the fake KMS, with certificates from a throwaway CA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsctl import KmsClient, RetryPolicy, UnavailableError
from tests.support import fake_kms
from tests.support.fake_kms import FakeKms, RunningServer
from tests.support.pki_for_tests import ThrowawayPki, make_pki

NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def pki() -> ThrowawayPki:
    return make_pki()


@pytest.fixture
def served(pki: ThrowawayPki) -> Iterator[RunningServer]:
    running = fake_kms.start(FakeKms(), pki)
    yield running
    running.stop()


def client(
    target: str,
    pki: ThrowawayPki,
    *,
    ca_pem: bytes | None = None,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
) -> KmsClient:
    return KmsClient(
        target,
        ca_pem=ca_pem or pki.ca_pem,
        cert_pem=cert_pem or pki.client_cert_pem,
        key_pem=key_pem or pki.client_key_pem,
        timeout=5.0,
        retries=NO_RETRY,
    )


def test_mutual_tls_works_and_the_server_sees_the_client_identity(
    served: RunningServer, pki: ThrowawayPki
) -> None:
    with client(served.target, pki) as kms:
        assert len(kms.list_keys()) == 4
    assert served.fake.identities == ["build-server"]


def test_from_files_reads_pem_files(served: RunningServer, pki: ThrowawayPki, tmp_path: Path) -> None:
    pki.write_state_dir(tmp_path)
    clients = tmp_path / "pki" / "clients"
    with KmsClient.from_files(
        f"localhost:{served.port}",
        ca=tmp_path / "pki" / "ca.pem",
        cert=clients / "build-server.pem",
        key=clients / "build-server.key",
    ) as kms:
        assert kms.get_public_key("keys/thermostat-sb0").key_version == "keys/thermostat-sb0/versions/2"


def test_from_files_raises_oserror_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        KmsClient.from_files("localhost:1", ca=tmp_path / "ca.pem", cert=tmp_path / "c", key=tmp_path / "k")


def test_a_server_certificate_from_another_ca_is_refused(served: RunningServer, pki: ThrowawayPki) -> None:
    with client(served.target, pki, ca_pem=make_pki().ca_pem) as kms, pytest.raises(UnavailableError):
        kms.list_keys()
    assert served.fake.calls == []


def test_a_client_certificate_from_another_ca_is_refused(served: RunningServer, pki: ThrowawayPki) -> None:
    stranger = make_pki()
    with (
        client(served.target, pki, cert_pem=stranger.client_cert_pem, key_pem=stranger.client_key_pem) as kms,
        pytest.raises(UnavailableError),
    ):
        kms.list_keys()
    assert served.fake.calls == []


def test_server_name_override_checks_the_certificate_against_another_name() -> None:
    pki = make_pki(server_dns_names=("kms.internal",), server_ips=())
    running = fake_kms.start(FakeKms(), pki)
    try:
        with client(running.target, pki) as kms, pytest.raises(UnavailableError):
            kms.list_keys()
        with KmsClient(
            running.target,
            ca_pem=pki.ca_pem,
            cert_pem=pki.client_cert_pem,
            key_pem=pki.client_key_pem,
            server_name_override="kms.internal",
            retries=NO_RETRY,
        ) as kms:
            assert kms.list_keys()
    finally:
        running.stop()
