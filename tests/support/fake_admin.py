"""A key administration server for client and CLI tests: the real ``KeyAdminServicer`` on a fake HSM.

The servicer, the lifecycle rules and the SQLite store are the service's own; only the HSM is a fake
(``SoftwareHsm``: ids, software P-256 keys that sign, dummy public keys otherwise), and the clock is
settable. It is served over mutual TLS with the development PKI (``kms.server.pki``), so ``kmsctl
--state-dir`` finds the security officer's certificate and the servicer sees the officer's SPIFFE
identity. There is no authorization interceptor: which roles may call is the real server's business
(tests/e2e/test_key_admin.py).

``FailFirst`` makes the first calls of chosen methods fail with UNAVAILABLE before they reach the servicer,
and counts the calls of every method, to show which calls the client retries.
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from kms.domain.errors import HsmFailure, HsmUnavailable, KmsError
from kms.domain.keys import Algorithm
from kms.domain.ports import GeneratedKeyPair, ImportedSecret, TransportBatch
from kms.server.admin_servicers import add_key_admin
from kms.server.pki import create_dev_pki
from kms.service.keys import KeyAdministration
from kms.service.lifecycle import KeyLifecycle
from kms.store.database import Database
from kms.store.keys import SqliteKeyRepository

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
OFFICER = "spiffe://kms.dev/security-officer/dev"


class SoftwareHsm:
    """Generation and destruction, and ECDSA P-256 signing (OTA manifest key rotations sign rollover
    statements): P-256 pairs are real software keys, other pairs get dummy public keys and do not sign.
    ``generated`` counts generations; ``fail_generate`` makes the next that many raise ``HsmUnavailable``."""

    def __init__(self) -> None:
        self.held: dict[bytes, str] = {}
        self.p256: dict[bytes, ec.EllipticCurvePrivateKey] = {}
        self.generated = 0
        self.fail_generate = 0

    def _new(self, label: str) -> bytes:
        if self.fail_generate > 0:
            self.fail_generate -= 1
            raise HsmUnavailable("the HSM cannot be reached (fake)")
        self.generated += 1
        hsm_id = secrets.token_bytes(16)
        self.held[hsm_id] = label
        return hsm_id

    def generate_key_pair(self, algorithm: Algorithm, label: str) -> GeneratedKeyPair:
        hsm_id = self._new(label)
        if algorithm is not Algorithm.ECDSA_P256_SHA256:
            return GeneratedKeyPair(hsm_id, b"public " + hsm_id)
        private = self.p256[hsm_id] = ec.generate_private_key(ec.SECP256R1())
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return GeneratedKeyPair(hsm_id, der)

    def generate_secret_key(self, algorithm: Algorithm, label: str) -> bytes:
        return self._new(label)

    def destroy_key_pair(self, hsm_id: bytes) -> None:
        self.held.pop(hsm_id, None)

    def sign_digest(self, hsm_id: bytes, algorithm: Algorithm, digest: bytes) -> bytes:
        if hsm_id not in self.held or hsm_id not in self.p256:
            raise HsmFailure("no such P-256 key in the fake HSM")
        der = self.p256[hsm_id].sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def import_secrets(
        self,
        kek_hsm_id: bytes,
        secrets: Sequence[bytes],
        *,
        transport: TransportBatch | None,
        fingerprint_message: bytes,
    ) -> list[ImportedSecret | KmsError]:
        raise NotImplementedError

    def hmac_with_wrapped_secret(self, kek_hsm_id: bytes, wrapped: bytes, message: bytes) -> bytes:
        raise NotImplementedError

    def hmac(self, hsm_id: bytes, message: bytes) -> bytes:
        raise NotImplementedError

    def rewrap_secrets(
        self, old_kek_hsm_id: bytes, new_kek_hsm_id: bytes, blobs: Sequence[bytes]
    ) -> list[bytes | KmsError]:
        raise NotImplementedError

    def is_available(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class FailFirst(grpc.ServerInterceptor):
    """Counts calls per method name (``"RotateKey"``); fails the first ``failures[name]`` with UNAVAILABLE."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        name = handler_call_details.method.rpartition("/")[2]
        self.calls[name] += 1
        if self.failures[name] > 0:
            self.failures[name] -= 1

            def unavailable(request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is restarting (fake)")

            return grpc.unary_unary_rpc_method_handler(unavailable)
        return continuation(handler_call_details)


@dataclass
class RunningAdmin:
    state_dir: Path
    server: grpc.Server
    port: int
    database: Database
    hsm: SoftwareHsm
    clock: Clock
    lifecycle: KeyLifecycle
    interceptor: FailFirst
    changed: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None).wait()
        self.database.close()


def start(state_dir: Path) -> RunningAdmin:
    """Serve key administration for the state in ``state_dir`` (dev PKI under ``pki/``, ``kms.db``)."""
    create_dev_pki(state_dir / "pki")
    database = Database.open(state_dir / "kms.db")
    keys = SqliteKeyRepository(database)
    hsm, clock, interceptor = SoftwareHsm(), Clock(), FailFirst()
    changed: list[str] = []
    lifecycle = KeyLifecycle(hsm, keys, clock=clock, changed=changed.append)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[interceptor])
    add_key_admin(server, lifecycle, KeyAdministration(hsm, keys, clock), keys)
    pki = state_dir / "pki"
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return RunningAdmin(state_dir, server, port, database, hsm, clock, lifecycle, interceptor, changed)
