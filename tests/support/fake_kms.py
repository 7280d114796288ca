"""A fake firmware KMS for client tests: the generated servicers over a real gRPC server on loopback.

It follows the API's contract (header then chunks of at most 256 KiB, release then 128 KiB chunks, CRC32C
checks) with software keys, and can be told to misbehave: fail with UNAVAILABLE a number of times, abort
with a given status, stall, or tamper with a response in one of the ways listed in ``Tamper``. The "signed
image" is the input padded with 0xFF to a multiple of 4096 plus a 4096-byte sector of 0x5A: the client does
not parse it, only checks it against the release.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Literal, cast

import google_crc32c
import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from kmsapi.v1 import common_pb2, keys_pb2, keys_pb2_grpc, signing_pb2, signing_pb2_grpc
from kmsctl import sbv2_key_digest

from tests.support.pki_for_tests import ThrowawayPki

SERVER_MAX_CHUNK = 256 * 1024
DOWNLOAD_CHUNK = 128 * 1024

Tamper = Literal[
    "none",
    "output-sha256",  # release announces a different SHA-256
    "flip-byte",  # one byte of the signed image changed in transit
    "truncate",  # last byte missing
    "extra-byte",  # one byte more than announced
    "chunk-first",  # image bytes before the release
    "no-release",  # the stream ends without sending anything
    "input-sha256",  # release claims another input was signed
    "signature-crc",  # SignDigest: signature_crc32c wrong
    "unverified",  # SignDigest: verified_digest_crc32c false
    "encoding",  # SignDigest: returns the other encoding
    "pem-crc",  # GetPublicKey: pem_crc32c wrong
    "sbv2-digest",  # GetPublicKey: wrong eFuse digest
    "algorithm",  # GetPublicKey: wrong algorithm
]


@dataclass(frozen=True)
class FakeKey:
    name: str
    product: str
    purpose: common_pb2.KeyPurpose
    algorithm: common_pb2.SignatureAlgorithm
    slot: int
    versions: tuple[tuple[int, common_pb2.KeyVersionState], ...]
    primary: int


@cache
def private_key(key_version: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """The fake's private key for a key version (generated once per test session)."""
    algorithm = key_of(key_version).algorithm
    if algorithm == common_pb2.RSA_3072_PSS_SHA256:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    curve = ec.SECP384R1() if algorithm == common_pb2.ECDSA_P384_SHA384 else ec.SECP256R1()
    return ec.generate_private_key(curve)


def key_of(key_version: str) -> FakeKey:
    return KEYS[key_version.partition("/versions/")[0]]


def public_pem(key_version: str) -> str:
    return (
        private_key(key_version)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


KEYS = {
    key.name: key
    for key in (
        FakeKey(
            "keys/thermostat-sb0",
            "thermostat",
            common_pb2.SECURE_BOOT_V2,
            common_pb2.ECDSA_P256_SHA256,
            0,
            ((1, common_pb2.DISABLED), (2, common_pb2.ENABLED)),
            2,
        ),
        FakeKey(
            "keys/thermostat-sb1",
            "thermostat",
            common_pb2.SECURE_BOOT_V2,
            common_pb2.RSA_3072_PSS_SHA256,
            1,
            ((1, common_pb2.ENABLED),),
            1,
        ),
        FakeKey(
            "keys/artifacts",
            "thermostat",
            common_pb2.DIGEST_SIGNING,
            common_pb2.ECDSA_P384_SHA384,
            -1,
            ((1, common_pb2.ENABLED),),
            1,
        ),
        FakeKey(
            "keys/doorbell-sb0",
            "doorbell",
            common_pb2.SECURE_BOOT_V2,
            common_pb2.ECDSA_P256_SHA256,
            0,
            ((1, common_pb2.ENABLED),),
            1,
        ),
    )
}


def signed_image(image: bytes) -> bytes:
    """What the fake returns for ``image``."""
    padded = image + b"\xff" * (-len(image) % 4096)
    return padded + b"\x5a" * 4096


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


@dataclass
class FakeKms(signing_pb2_grpc.SigningServiceServicer, keys_pb2_grpc.KeyServiceServicer):
    """Behaviour switches (set them before a call) and records of what the fake received."""

    fail_unavailable: int = 0
    fail_mid_stream: int = 0
    abort_with: tuple[grpc.StatusCode, str] | None = None
    delay: float = 0.0
    tamper: Tamper = "none"
    calls: list[str] = field(default_factory=list)
    headers: list[signing_pb2.SignImageHeader] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)
    digest_requests: list[signing_pb2.SignDigestRequest] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)
    signed: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls.append(method)
            self.identities.extend(identity.decode() for identity in context.peer_identities() or ())
            if self.fail_unavailable > 0:
                self.fail_unavailable -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "HSM unreachable (fake)")
            if self.abort_with is not None:
                context.abort(*self.abort_with)
        if self.delay:
            time.sleep(self.delay)

    def SignImage(  # noqa: N802
        self, request_iterator: Iterator[signing_pb2.SignImageRequest], context: grpc.ServicerContext
    ) -> Iterator[signing_pb2.SignImageResponse]:
        self._enter("SignImage", context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the header")
        header = first.header
        self.headers.append(header)
        if header.product not in {key.product for key in KEYS.values()}:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown product {header.product!r}")
        image = bytearray()
        for request in request_iterator:
            if request.WhichOneof("part") != "chunk" or len(request.chunk) > SERVER_MAX_CHUNK:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a chunk of at most 256 KiB")
            self.chunk_sizes.append(len(request.chunk))
            image += request.chunk
        if len(image) != header.image_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image size differs from the header")
        input_sha256 = hashlib.sha256(image).digest()
        if header.image_sha256 and header.image_sha256 != input_sha256:
            context.abort(grpc.StatusCode.DATA_LOSS, "image SHA-256 differs from the header")
        output = signed_image(bytes(image))
        output_sha256 = hashlib.sha256(output).digest()
        release = signing_pb2.Release(
            name=f"releases/{output_sha256.hex()}",
            product=header.product,
            chip="esp32s3",
            version="1.2.3",
            secure_version=4,
            project_name="fake-app",
            input_sha256=input_sha256,
            output_sha256=output_sha256,
            output_size=len(output),
            key_versions=[
                f"{key.name}/versions/{key.primary}"
                for key in sorted(KEYS.values(), key=lambda key: key.slot)
                if key.product == header.product and key.purpose == common_pb2.SECURE_BOOT_V2
            ],
            signed_by=self.identities[-1] if self.identities else "insecure",
            reused=output_sha256 in self.signed,
        )
        release.create_time.FromDatetime(datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))
        self.signed.add(output_sha256)
        yield from self._tampered_download(release, output, context)

    def _tampered_download(
        self, release: signing_pb2.Release, output: bytes, context: grpc.ServicerContext
    ) -> Iterator[signing_pb2.SignImageResponse]:
        tamper = self.tamper
        if tamper == "output-sha256":
            release.output_sha256 = hashlib.sha256(b"other").digest()
        elif tamper == "input-sha256":
            release.input_sha256 = hashlib.sha256(b"other").digest()
        elif tamper == "flip-byte":
            output = output[:10] + bytes([output[10] ^ 1]) + output[11:]
        elif tamper == "truncate":
            output = output[:-1]
        elif tamper == "extra-byte":
            output += b"!"
        if tamper == "chunk-first":
            yield signing_pb2.SignImageResponse(chunk=output[:DOWNLOAD_CHUNK])
        if tamper == "no-release":
            return
        yield signing_pb2.SignImageResponse(release=release)
        for offset in range(0, len(output), DOWNLOAD_CHUNK):
            yield signing_pb2.SignImageResponse(chunk=output[offset : offset + DOWNLOAD_CHUNK])
            with self._lock:
                fail = self.fail_mid_stream > 0
                self.fail_mid_stream -= fail
            if fail:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection to the HSM lost (fake)")

    def SignDigest(  # noqa: N802
        self, request: signing_pb2.SignDigestRequest, context: grpc.ServicerContext
    ) -> signing_pb2.SignDigestResponse:
        self._enter("SignDigest", context)
        self.digest_requests.append(request)
        key_version = self._key_version(request.name, context)
        key = private_key(key_version)
        digest = request.digest.sha256 or request.digest.sha384
        algorithm = key_of(key_version).algorithm
        expected = "sha384" if algorithm == common_pb2.ECDSA_P384_SHA384 else "sha256"
        if request.digest.WhichOneof("digest") != expected:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"this key signs {expected} digests")
        if request.HasField("digest_crc32c") and request.digest_crc32c != crc32c(digest):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "digest CRC32C mismatch")
        der = request.encoding == common_pb2.DER
        if self.tamper == "encoding":
            der = not der
        if isinstance(key, rsa.RSAPrivateKey):
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            signature = key.sign(digest, pss, utils.Prehashed(hashes.SHA256()))
        else:
            hash_algorithm: hashes.HashAlgorithm = (
                hashes.SHA384() if expected == "sha384" else hashes.SHA256()
            )
            signature = key.sign(digest, ec.ECDSA(utils.Prehashed(hash_algorithm)))
            if not der:
                r, s = utils.decode_dss_signature(signature)
                size = (key.curve.key_size + 7) // 8
                signature = r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return signing_pb2.SignDigestResponse(
            signature=signature,
            signature_crc32c=crc32c(signature) ^ (self.tamper == "signature-crc"),
            verified_digest_crc32c=request.HasField("digest_crc32c") and self.tamper != "unverified",
            key_version=key_version,
            algorithm=algorithm,
            encoding=common_pb2.DER if der else common_pb2.RAW,
        )

    def GetPublicKey(  # noqa: N802
        self, request: keys_pb2.GetPublicKeyRequest, context: grpc.ServicerContext
    ) -> keys_pb2.PublicKey:
        self._enter("GetPublicKey", context)
        key_version = self._key_version(request.name, context)
        pem = public_pem(key_version)
        digest = sbv2_key_digest(pem)
        algorithm = key_of(key_version).algorithm
        if self.tamper == "sbv2-digest":
            digest = bytes(32)
        if self.tamper == "algorithm":
            algorithm = (
                common_pb2.ECDSA_P256_SHA256
                if algorithm == common_pb2.RSA_3072_PSS_SHA256
                else common_pb2.RSA_3072_PSS_SHA256
            )
        return keys_pb2.PublicKey(
            key_version=key_version,
            algorithm=algorithm,
            pem=pem,
            pem_crc32c=crc32c(pem.encode()) ^ (self.tamper == "pem-crc"),
            sbv2_key_digest=digest,
        )

    def ListKeys(  # noqa: N802
        self, request: keys_pb2.ListKeysRequest, context: grpc.ServicerContext
    ) -> keys_pb2.ListKeysResponse:
        self._enter("ListKeys", context)
        response = keys_pb2.ListKeysResponse()
        for key in KEYS.values():
            if request.product and key.product != request.product:
                continue
            message = response.keys.add(
                name=key.name,
                product=key.product,
                purpose=key.purpose,
                algorithm=key.algorithm,
                sbv2_slot=key.slot,
                primary_version=f"{key.name}/versions/{key.primary}",
            )
            for number, state in key.versions:
                version = message.versions.add(name=f"{key.name}/versions/{number}", state=state)
                version.create_time.FromDatetime(datetime(2025, 1, 1, tzinfo=UTC))
        return response

    def _key_version(self, name: str, context: grpc.ServicerContext) -> str:
        base, _, number = name.partition("/versions/")
        key = KEYS.get(base)
        if key is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no key {base!r}")
        if number and int(number) not in {n for n, _ in key.versions}:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no version {number} of {base}")
        return f"{base}/versions/{number or key.primary}"


_AddServicer = Callable[[object, grpc.Server], None]
_add_signing = cast(_AddServicer, signing_pb2_grpc.add_SigningServiceServicer_to_server)
_add_keys = cast(_AddServicer, keys_pb2_grpc.add_KeyServiceServicer_to_server)


@dataclass
class RunningServer:
    fake: FakeKms
    server: grpc.Server
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)


def start(fake: FakeKms, pki: ThrowawayPki | None = None) -> RunningServer:
    """Serve ``fake`` on a free loopback port; with ``pki``, over mutual TLS requiring a client cert."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", SERVER_MAX_CHUNK + 1024)],
    )
    _add_signing(fake, server)
    _add_keys(fake, server)
    if pki is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [(pki.server_key_pem, pki.server_cert_pem)],
            root_certificates=pki.ca_pem,
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return RunningServer(fake, server, port)
