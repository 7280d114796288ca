"""``kmsctl keys rollover``: the OTA manifest key rollover chain for devices (docs/manifest-key-rollover.md).

Synopsis::

    kmsctl keys rollover --product P (--trusted-key-id HEX | --trusted-key PEM) -o FILE

asks ``KeyService.GetManifestKeyRollover`` for the statements that move a device of product P, which trusts
the manifest key with id HEX (SHA-256 of its DER SubjectPublicKeyInfo, as in FKSP headers) or the public key
in PEM, to the product's current manifest key, and writes them to FILE **concatenated, oldest first** (the
FKRS v1 chain form: each statement's length follows from its own length fields, so no separator is needed;
``kmsctl.device.rollover.split_statements`` splits it). FILE is empty when the device already trusts the
current key. ``--json`` prints the chain's summary (versions, key ids, sizes), not the statements.

Before anything is written the chain is checked client-side, with the device-side verifier
(``kmsctl.device.rollover``): every statement parses, the key ids link the trusted key to the current one,
and every signature verifies under the key the previous statement introduced. The first statement's
signature needs the trusted key itself: it is verified with ``--trusted-key``; with ``--trusted-key-id``
only the device can check it. A chain that fails is an ``IntegrityError`` (exit 8) and leaves no file.

The default identity is ``distribution-server`` (who serves devices); every role may call it for the
products in its scope. ``cli.build_parser`` registers the command with ``add_rollover_commands``.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kmsctl import _officer_cli
from kmsctl.device.rollover import RolloverRejected, parse_statement, statement_key, verify_statement
from kmsctl.errors import IntegrityError

if TYPE_CHECKING:
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

DISTRIBUTION_SERVER = "distribution-server"
KEY_ID_LEN = 32


@dataclass(frozen=True)
class RolloverStatementInfo:
    """One statement as the server describes it; ``statement`` holds the bytes a device checks."""

    statement: bytes
    from_version: str
    to_version: str
    from_key_id: bytes
    to_key_id: bytes
    create_time: datetime | None


@dataclass(frozen=True)
class RolloverChainInfo:
    """The statements from the trusted key to ``current_version`` (key id ``current_key_id``), oldest
    first; ``first_signature_checked`` says whether the first signature was verified client-side."""

    product: str
    trusted_key_id: bytes
    statements: tuple[RolloverStatementInfo, ...]
    current_version: str
    current_key_id: bytes
    first_signature_checked: bool

    def chain_bytes(self) -> bytes:
        return b"".join(s.statement for s in self.statements)


def get_manifest_key_rollover(
    client: KmsClient, product: str, trusted_key_id: bytes, *, trusted_key_der: bytes | None = None
) -> RolloverChainInfo:
    """Fetch and check (see the module docstring) the rollover chain of ``product`` from ``trusted_key_id``.

    Read-only, so retried on UNAVAILABLE like every read. ``trusted_key_der`` (the trusted key's DER
    SubjectPublicKeyInfo) lets the first signature be checked too.
    """
    from kmsapi.v1 import keys_pb2

    response = _officer_cli.call(
        client,
        keys_pb2.DESCRIPTOR,
        "KeyService",
        "GetManifestKeyRollover",
        keys_pb2.GetManifestKeyRolloverRequest(product=product, trusted_key_id=trusted_key_id),
        keys_pb2.GetManifestKeyRolloverResponse,
        retry=True,
    )
    statements = tuple(
        RolloverStatementInfo(
            statement=s.statement,
            from_version=s.from_version,
            to_version=s.to_version,
            from_key_id=s.from_key_id,
            to_key_id=s.to_key_id,
            create_time=_officer_cli.moment(s, "create_time"),
        )
        for s in response.statements
    )
    chain = RolloverChainInfo(
        product,
        trusted_key_id,
        statements,
        response.current_version,
        response.current_key_id,
        first_signature_checked=trusted_key_der is not None,
    )
    check_chain(chain, trusted_key_der)
    return chain


def _p256(der: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("manifest keys are ECDSA P-256 keys")
    return key


def check_chain(chain: RolloverChainInfo, trusted_key_der: bytes | None = None) -> None:
    """``IntegrityError`` unless the chain leads from the trusted key id to the current one, every statement
    passes the device's checks (the first one's signature only if ``trusted_key_der`` is given), and the
    server's description of each statement matches its bytes."""
    product = chain.product.encode("ascii")
    expected = chain.trusted_key_id
    trusted: dict[bytes, ec.EllipticCurvePublicKey] | None = None
    if trusted_key_der is not None:
        if hashlib.sha256(trusted_key_der).digest() != expected:
            raise IntegrityError("the trusted key's SHA-256 is not the trusted key id")
        trusted = {expected: _p256(trusted_key_der)}
    for index, info in enumerate(chain.statements):
        where = f"rollover statement {index} ({info.from_version} -> {info.to_version})"
        if info.from_key_id != expected:
            raise IntegrityError(
                f"{where} is signed by key id {info.from_key_id.hex()}, not {expected.hex()}: the chain "
                "does not link"
            )
        try:
            if trusted is None:  # only the device holds the first signer's key: check all but the signature
                statement = parse_statement(info.statement)
                key = statement_key(statement)
                if statement.product != product:
                    raise IntegrityError(f"{where} is for product {statement.product!r}")
            else:
                statement, key = verify_statement(info.statement, product, trusted)
        except RolloverRejected as rejected:
            raise IntegrityError(
                f"{where} fails the device's check: {rejected.verdict.value}: {rejected.detail}"
            ) from None
        described = (info.from_key_id, info.to_key_id, _number(info.from_version), _number(info.to_version))
        if (statement.from_key_id, statement.to_key_id, statement.from_version, statement.to_version) != (
            described
        ):
            raise IntegrityError(f"{where}: its bytes differ from the server's description")
        trusted = {statement.to_key_id: key}
        expected = statement.to_key_id
    if expected != chain.current_key_id:
        raise IntegrityError(
            f"the rollover chain ends at key id {expected.hex()}, not at the current key "
            f"{chain.current_version} ({chain.current_key_id.hex()})"
        )


def _number(version_name: str) -> int:
    tail = version_name.rpartition("/versions/")[2]
    return int(tail) if tail.isdigit() else -1


# -- the command ---------------------------------------------------------------------------------------


def add_rollover_commands(subparsers: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``rollover`` to ``subparsers`` (those of ``kmsctl keys``); ``common_parents`` are the connection
    and output option parsers every command shares."""
    sub = _officer_cli.add_command(
        subparsers,
        common_parents,
        "rollover",
        "Write the rollover statements that move a device to the product's current manifest key.",
        _rollover,
        identity=DISTRIBUTION_SERVER,
        epilog=(
            "FILE gets the statements concatenated, oldest first (empty: the device trusts the current\n"
            "key already); format: docs/manifest-key-rollover.md\n\n"
        ),
    )
    sub.add_argument("--product", required=True, help="the product the device belongs to")
    trusted = sub.add_mutually_exclusive_group(required=True)
    trusted.add_argument(
        "--trusted-key-id",
        metavar="HEX",
        help="the manifest key id the device trusts (64 hex digits: SHA-256 of the key's DER SPKI)",
    )
    trusted.add_argument(
        "--trusted-key",
        metavar="PEM",
        help="the manifest public key the device trusts (PEM); also checks the first statement's signature",
    )
    sub.add_argument("-o", "--output", metavar="FILE", required=True, help="where to write the statements")


def _trusted(args: argparse.Namespace) -> tuple[bytes, bytes | None]:
    """(key id, DER or None) from ``--trusted-key-id`` or ``--trusted-key``."""
    from kmsctl.cli import BadInputError

    if args.trusted_key is not None:
        try:
            key = _p256_pem(Path(args.trusted_key).read_bytes())
        except (ValueError, UnsupportedAlgorithm) as error:
            raise BadInputError(f"--trusted-key: {error}") from None
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).digest(), der
    try:
        key_id = bytes.fromhex(args.trusted_key_id)
    except ValueError:
        key_id = b""
    if len(key_id) != KEY_ID_LEN:
        raise BadInputError("--trusted-key-id expects 64 hex digits (a SHA-256 key id)")
    return key_id, None


def _p256_pem(pem: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 public key (manifest keys are)")
    return key


def _rollover(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl._files import atomic_write
    from kmsctl.cli import Outcome

    key_id, der = _trusted(args)
    chain = get_manifest_key_rollover(client, args.product, key_id, trusted_key_der=der)
    data = chain.chain_bytes()
    atomic_write(args.output, data)
    result = {
        "product": chain.product,
        "trusted_key_id": chain.trusted_key_id.hex(),
        "current_version": chain.current_version,
        "current_key_id": chain.current_key_id.hex(),
        "first_signature_checked": chain.first_signature_checked,
        "statements": [
            {
                "from_version": s.from_version,
                "to_version": s.to_version,
                "from_key_id": s.from_key_id.hex(),
                "to_key_id": s.to_key_id.hex(),
                "create_time": None if s.create_time is None else s.create_time.isoformat(),
                "size": len(s.statement),
            }
            for s in chain.statements
        ],
        "output": str(args.output),
        "output_size": len(data),
    }
    if not chain.statements:
        title = f"the device trusts {chain.current_version} already: wrote an empty {args.output}"
    else:
        steps = " -> ".join([chain.statements[0].from_version, *(s.to_version for s in chain.statements)])
        count, plural = len(chain.statements), "s" if len(chain.statements) != 1 else ""
        title = f"wrote {count} rollover statement{plural} ({len(data)} bytes) to {args.output}"
        title += f": {steps}"
    if chain.statements and not chain.first_signature_checked:
        title += "\n(the first signature is checked by the device; pass --trusted-key to check it here)"
    return Outcome(result, title)
