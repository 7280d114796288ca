"""A development PKI: one CA, a server certificate and one client certificate per role.

For development and tests only; production brings its own CA (README, "Production PKI"). Layout under
``STATE_DIR/pki``::

    ca.pem, ca.key                      the development CA (ECDSA P-256, 10 years)
    server.pem, server.key              SAN DNS:localhost, IP:127.0.0.1, IP:::1
    clients/{role}.pem, {role}.key      SAN URI spiffe://kms.dev/{role}/dev, CN {role}
    clients/security-officer-{name}.*   two more officers, bob and carol, SAN URI
                                        spiffe://kms.dev/security-officer/{name}, so that dual control (two
                                        approvals by officers other than the requester) works out of the box:
                                        ``kmsctl approvals approve ID --identity security-officer-bob``

A caller's identity is the first URI SAN of its certificate; its role is the first path segment of a
``spiffe://`` identity (see ``kms.server.auth``). Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kms.domain.identity import Role

TRUST_DOMAIN = "kms.dev"
DEV_OFFICERS = ("bob", "carol")
"""The extra officers of the development PKI (``[dual_control] required_approvals`` is 2 by default)."""
_VALIDITY = dt.timedelta(days=3650)


def spiffe_id(role: Role, name: str = "dev") -> str:
    return f"spiffe://{TRUST_DOMAIN}/{role.value}/{name}"


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    sans: list[x509.GeneralName],
    *,
    server: bool,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        _builder(common_name, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_ca(
    common_name: str = "Firmware KMS development CA",
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(common_name, name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _load_ca(pki_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key((pki_dir / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pki_dir / 'ca.key'} is not the development CA's EC key")
    return key, x509.load_pem_x509_certificate((pki_dir / "ca.pem").read_bytes())


def issue_dev_client(
    pki_dir: Path,
    role: Role,
    name: str,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
) -> str:
    """Issue ``clients/ROLE-NAME.{pem,key}`` (identity ``spiffe://kms.dev/ROLE/NAME``) with the development
    CA (``ca``, else read from ``pki_dir``) unless it exists; return the file stem, the ``--identity`` that
    picks it. For extra identities: more officers, a second factory station, tests."""
    stem = f"{role.value}-{name}"
    if not (pki_dir / "clients" / f"{stem}.pem").exists():
        ca_key, ca_cert = ca or _load_ca(pki_dir)
        uri = x509.UniformResourceIdentifier(spiffe_id(role, name))
        key, cert = issue(ca_key, ca_cert, stem, [uri], server=False)
        _write_private(pki_dir / "clients" / f"{stem}.key", key)
        _write_cert(pki_dir / "clients" / f"{stem}.pem", cert)
    return stem


def _issue_officers(pki_dir: Path, ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate]) -> None:
    """Issue the ``DEV_OFFICERS`` certificates that do not exist yet."""
    for name in DEV_OFFICERS:
        issue_dev_client(pki_dir, Role.SECURITY_OFFICER, name, ca)


def create_dev_pki(pki_dir: Path) -> None:
    """Create the development PKI under ``pki_dir`` unless it exists (idempotent); a PKI made before the
    extra officers existed gets them."""
    if (pki_dir / "ca.pem").exists():
        if (pki_dir / "ca.key").exists():
            _issue_officers(pki_dir, _load_ca(pki_dir))
        return
    (pki_dir / "clients").mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca()
    server_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    key, cert = issue(ca_key, ca_cert, "localhost", server_sans, server=True)
    _write_private(pki_dir / "server.key", key)
    _write_cert(pki_dir / "server.pem", cert)
    for role in Role:
        key, cert = issue(
            ca_key, ca_cert, role.value, [x509.UniformResourceIdentifier(spiffe_id(role))], server=False
        )
        _write_private(pki_dir / "clients" / f"{role.value}.key", key)
        _write_cert(pki_dir / "clients" / f"{role.value}.pem", cert)
    _issue_officers(pki_dir, (ca_key, ca_cert))
    _write_private(pki_dir / "ca.key", ca_key)
    _write_cert(pki_dir / "ca.pem", ca_cert)  # written last: its presence marks a complete PKI
