"""Client certificates of any role for end-to-end tests, issued with the dev CA of a state directory.

``issue_client(state_dir, role, name)`` writes ``STATE/pki/clients/ROLE-NAME.{pem,key}`` with the identity
``spiffe://kms.dev/ROLE/NAME``, so ``RunningKms.credentials("ROLE-NAME")`` and
``tests.support.officers.officer_channel(server, "ROLE-NAME")`` use it. ``tests.support.officers`` does the
same for security officers only; this is for tests that need one identity per role (a product policy that
scopes each of them, say).
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kms.server.pki import issue

TRUST_DOMAIN = "kms.dev"  # the dev PKI's (kms.server.pki)


def client_identity(role: str, name: str) -> str:
    """The identity ``issue_client(.., role, name)`` certifies."""
    return f"spiffe://{TRUST_DOMAIN}/{role}/{name}"


def issue_client(state_dir: Path, role: str, name: str) -> str:
    """Issue a client certificate for ``role``/``name`` (unless one exists); return its file stem."""
    stem = f"{role}-{name}"
    clients = state_dir / "pki" / "clients"
    if (clients / f"{stem}.pem").exists():
        return stem
    pki = state_dir / "pki"
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    uri = x509.UniformResourceIdentifier(client_identity(role, name))
    key, cert = issue(ca_key, ca_cert, f"{role} {name}", [uri], server=False)
    (clients / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (clients / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return stem
