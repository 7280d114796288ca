"""A throwaway PKI for tests: one CA, a server certificate and a client certificate, all ECDSA P-256.

Nothing here is for production; the service's own development PKI is created by ``kms init``. The files can
be laid out as that PKI is (``write_state_dir``), so the CLI finds them through ``--state-dir``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ThrowawayPki:
    """PEM bytes of a CA certificate, and of a server and a client certificate it issued, with keys."""

    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes

    def write_state_dir(self, state_dir: Path, identity: str = "build-server") -> None:
        """Write ``pki/ca.pem`` and ``pki/clients/IDENTITY.{pem,key}`` under ``state_dir``."""
        clients = state_dir / "pki" / "clients"
        clients.mkdir(parents=True, exist_ok=True)
        (state_dir / "pki" / "ca.pem").write_bytes(self.ca_pem)
        (clients / f"{identity}.pem").write_bytes(self.client_cert_pem)
        (clients / f"{identity}.key").write_bytes(self.client_key_pem)


def make_pki(
    *,
    client_identity: str = "build-server",
    server_dns_names: tuple[str, ...] = ("localhost",),
    server_ips: tuple[str, ...] = ("127.0.0.1",),
) -> ThrowawayPki:
    """A fresh CA with a server certificate for ``server_dns_names``/``server_ips`` and a client
    certificate whose common name and DNS SAN are ``client_identity``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kmsctl test CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key)
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
        .sign(ca_key, hashes.SHA256())
    )
    server_sans: list[x509.GeneralName] = [x509.DNSName(name) for name in server_dns_names]
    server_sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
    server_key, server_cert = _leaf(
        ca_cert, ca_key, "kmsctl test server", server_sans, ExtendedKeyUsageOID.SERVER_AUTH
    )
    client_key, client_cert = _leaf(
        ca_cert, ca_key, client_identity, [x509.DNSName(client_identity)], ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return ThrowawayPki(
        ca_pem=_cert_pem(ca_cert),
        server_cert_pem=_cert_pem(server_cert),
        server_key_pem=_key_pem(server_key),
        client_cert_pem=_cert_pem(client_cert),
        client_key_pem=_key_pem(client_key),
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
    )


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    sans: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        _builder(subject, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
