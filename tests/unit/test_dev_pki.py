"""The development PKI: one client certificate per role, plus two more officers for dual control."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509

from kms.domain.identity import Role
from kms.server.auth import caller_from_auth_context
from kms.server.pki import DEV_OFFICERS, create_dev_pki


def _identity(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate((cert_path.parent.parent / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = uris.get_values_for_type(x509.UniformResourceIdentifier)
    return str(uri)


def test_every_role_and_three_distinct_officers_get_a_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    create_dev_pki(pki)
    clients = pki / "clients"
    for role in Role:
        assert _identity(clients / f"{role.value}.pem") == f"spiffe://kms.dev/{role.value}/dev"
    officers = {_identity(clients / f"security-officer-{name}.pem") for name in DEV_OFFICERS}
    officers.add(_identity(clients / "security-officer.pem"))
    assert len(officers) == 3  # a requester and two other approvers: the default M of 2 works out of the box
    for identity in officers:
        auth = {"transport_security_type": [b"ssl"], "x509_subject_alternative_name": [identity.encode()]}
        assert caller_from_auth_context(auth).role is Role.SECURITY_OFFICER
    for key in clients.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_pki_made_before_the_extra_officers_gets_them_and_keeps_the_rest(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    create_dev_pki(pki)
    for name in DEV_OFFICERS:
        (pki / "clients" / f"security-officer-{name}.pem").unlink()
        (pki / "clients" / f"security-officer-{name}.key").unlink()
    before = {p.name: p.read_bytes() for p in (pki / "clients").iterdir()} | {
        "ca.pem": (pki / "ca.pem").read_bytes()
    }
    create_dev_pki(pki)
    after = {p.name: p.read_bytes() for p in (pki / "clients").iterdir()} | {
        "ca.pem": (pki / "ca.pem").read_bytes()
    }
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {
        f"security-officer-{n}.{ext}" for n in DEV_OFFICERS for ext in ("pem", "key")
    }
    assert _identity(pki / "clients" / "security-officer-bob.pem") == "spiffe://kms.dev/security-officer/bob"
