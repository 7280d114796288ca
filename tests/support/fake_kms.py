"""A fake firmware KMS for client tests: the generated servicers over a real gRPC server on loopback.

It follows the API's contract (header then chunks of at most 256 KiB, release then 128 KiB chunks, CRC32C
checks) with software keys, and can be told to misbehave: fail with UNAVAILABLE a number of times, abort
with a given status, stall, or tamper with a response in one of the ways listed in ``Tamper``. The "signed
image" is the input padded with 0xFF to a multiple of 4096 plus a 4096-byte sector of 0x5A: the client does
not parse it, only checks it against the release.

The device registry keeps plaintext secrets in a dict (after unwrapping them with its RSA registration key,
OAEP-SHA-1, and the stream's batch key, RFC 3394, as the HSM would), so tests can check what arrived.
Registration acknowledges each DeviceRows message once its rows are "committed", reading requests on a
thread of its own so that a client may run ahead (``max_unacked`` records how far it did);
``register_break_after`` cuts a stream with UNAVAILABLE right after committing a message and before
acknowledging it, the worst moment for a client. Payloads are deterministic pseudo-random bytes behind a
well-formed FKSP v1 header and manifest (or an esp_encrypted_img header) for the releases in ``RELEASES``;
``payload_break_after`` and ``payload_end_after`` cut a download with UNAVAILABLE or a clean early end.
"""

from __future__ import annotations

import hashlib
import queue
import re
import struct
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
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from kmsapi.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
)
from kmsctl import sbv2_key_digest
from tests.support.pki_for_tests import ThrowawayPki

SERVER_MAX_CHUNK = 256 * 1024
DOWNLOAD_CHUNK = 128 * 1024
PAYLOAD_CHUNK = 64 * 1024
MAX_ROWS_PER_MESSAGE = 1000

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
    "registration-key",  # GetRegistrationKey: a P-256 key instead of RSA-3072
    "ack-rows",  # RegisterDevices: acknowledges other row numbers than were sent
    "payload-device",  # GetPayload: the manifest names another device
    "payload-extra",  # GetPayload: one byte more than announced
]


@dataclass(frozen=True)
class FakeKey:
    name: str
    product: str
    purpose: common_pb2.KeyPurpose.ValueType
    algorithm: common_pb2.SignatureAlgorithm.ValueType
    slot: int
    versions: tuple[tuple[int, common_pb2.KeyVersionState.ValueType], ...]
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


# -- device registry and payloads ------------------------------------------------------------------------

CHIPS = {
    "esp32",
    "esp32s2",
    "esp32s3",
    "esp32c2",
    "esp32c3",
    "esp32c5",
    "esp32c6",
    "esp32c61",
    "esp32h2",
    "esp32p4",
}
_DEVICE_ID = re.compile(r"[\x21-\x7e]{1,64}")
# The transport's OAEP, as devices.proto specifies it (SHA-1: what SoftHSM2 implements).
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303


def registration_key_version(product: str) -> str:
    return f"keys/{product}-transport/versions/1"


@cache
def registration_private_key(product: str) -> rsa.RSAPrivateKey:
    """The fake's RSA-3072 registration transport key of a product (generated once per test session)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


@dataclass
class FakeDevice:
    device_id: str
    product: str
    chip: str
    secret: bytes
    ecies_public_key: bytes | None = None
    state: str = "active"
    registered_by: str = "factory-registrar"


@dataclass(frozen=True)
class FakeRelease:
    name: str
    product: str
    chip: str
    secure_version: int
    image_size: int
    version: str = "1.2.3"


def _release(product: str, image_size: int) -> FakeRelease:
    digest = hashlib.sha256(f"signed image of {product}".encode()).hexdigest()
    return FakeRelease(f"releases/{digest}", product, "esp32s3", 4, image_size)


RELEASES = {
    release.name: release for release in (_release("thermostat", 200_000), _release("doorbell", 5000))
}
THERMOSTAT_RELEASE = next(name for name, release in RELEASES.items() if release.product == "thermostat")
DOORBELL_RELEASE = next(name for name, release in RELEASES.items() if release.product == "doorbell")


def _stream(seed: str, size: int) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(size)


@cache
def payload_bytes(
    device_id: str, release_name: str, payload_format: int, segment_size: int, other_device: bool = False
) -> bytes:
    """The fake's payload: a well-formed FKSP v1 header and manifest (or esp_encrypted_img header), then
    pseudo-random bytes of the right length, all determined by the arguments."""
    release = RELEASES[release_name]
    seed = f"{device_id}|{release_name}|{payload_format}|{segment_size}"
    if payload_format == devices_pb2.ESP_ENCRYPTED_IMG_ECIES:
        esp_header = bytearray(_stream("esp header " + seed, 512))
        esp_header[0:4] = (0x0788B6CF).to_bytes(4, "little")
        esp_header[404:408] = release.image_size.to_bytes(4, "little")
        return bytes(esp_header) + _stream("esp body " + seed, release.image_size)
    segments = -(-release.image_size // segment_size)
    header = struct.pack(
        "<4sBBHIIQII32s",
        b"FKSP",
        1,
        1,
        64,
        segment_size,
        segments,
        release.image_size,
        256,
        64,
        hashlib.sha256(b"fake manifest key").digest(),
    )
    named = ("someone-else" if other_device else device_id).encode()
    manifest = bytearray(256)
    manifest[0:32] = bytes.fromhex(release.name.removeprefix("releases/"))
    manifest[32:40] = release.image_size.to_bytes(8, "little")
    manifest[40:44] = release.secure_version.to_bytes(4, "little")
    manifest[44:46] = (9).to_bytes(2, "little")
    manifest[48] = len(named)
    manifest[49 : 49 + len(named)] = named
    manifest[113] = len(release.product)
    manifest[114 : 114 + len(release.product)] = release.product.encode()
    signature = _stream("signature " + seed, 64)
    body = _stream("body " + seed, release.image_size + 16 * segments)
    return header + bytes(manifest) + signature + body


@dataclass
class FakeKms(
    signing_pb2_grpc.SigningServiceServicer,
    keys_pb2_grpc.KeyServiceServicer,
    devices_pb2_grpc.DeviceRegistryServiceServicer,
    devices_pb2_grpc.DistributionServiceServicer,
):
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
    # device registry
    devices: dict[str, FakeDevice] = field(default_factory=dict)
    register_headers: list[devices_pb2.RegisterDevicesHeader] = field(default_factory=list)
    wire_rows: list[devices_pb2.DeviceRow] = field(default_factory=list)
    message_sizes: list[int] = field(default_factory=list)
    register_break_after: list[int] = field(default_factory=list)
    register_ack_delay: float = 0.0
    max_unacked: int = 0
    # payloads
    payload_requests: list[devices_pb2.GetPayloadRequest] = field(default_factory=list)
    payload_break_after: list[int] = field(default_factory=list)
    payload_end_after: list[int] = field(default_factory=list)
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
        yield from self._tampered_download(release, output, context, sector_only=bool(header.content))

    def _tampered_download(
        self,
        release: signing_pb2.Release,
        output: bytes,
        context: grpc.ServicerContext,
        *,
        sector_only: bool = False,
    ) -> Iterator[signing_pb2.SignImageResponse]:
        tamper = self.tamper
        if tamper == "output-sha256":
            release.output_sha256 = hashlib.sha256(b"other").digest()
        elif tamper == "input-sha256":
            release.input_sha256 = hashlib.sha256(b"other").digest()
        elif tamper == "flip-byte":  # in the signature sector, which every content mode sends
            at = len(output) - 10
            output = output[:at] + bytes([output[at] ^ 1]) + output[at + 1 :]
        elif tamper == "truncate":
            output = output[:-1]
        elif tamper == "extra-byte":
            output += b"!"
        if tamper == "chunk-first":
            yield signing_pb2.SignImageResponse(chunk=output[:DOWNLOAD_CHUNK])
        if tamper == "no-release":
            return
        yield signing_pb2.SignImageResponse(release=release)
        if sector_only:  # SIGNATURE_SECTOR: the (possibly tampered) bytes from where the sector starts
            output = output[release.output_size - 4096 :]
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

    def GetManifestKeyRollover(  # noqa: N802
        self, request: keys_pb2.GetManifestKeyRolloverRequest, context: grpc.ServicerContext
    ) -> keys_pb2.GetManifestKeyRolloverResponse:
        self._enter("GetManifestKeyRollover", context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in the fake")

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

    # -- DeviceRegistryService ---------------------------------------------------------------------------

    def add_device(self, device_id: str, *, product: str = "thermostat", ecies: bool = False) -> FakeDevice:
        """Register a device directly (for payload tests); its secret is derived from its id."""
        device = FakeDevice(
            device_id,
            product,
            "esp32s3",
            hashlib.sha256(device_id.encode()).digest(),
            bytes(64) if ecies else None,
        )
        self.devices[device_id] = device
        return device

    def GetRegistrationKey(  # noqa: N802
        self, request: devices_pb2.GetRegistrationKeyRequest, context: grpc.ServicerContext
    ) -> devices_pb2.RegistrationKey:
        self._enter("GetRegistrationKey", context)
        self._product(request.product, context)
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = registration_private_key(
            request.product
        ).public_key()
        if self.tamper == "registration-key":
            public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        pem = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")
        return devices_pb2.RegistrationKey(key_version=registration_key_version(request.product), pem=pem)

    def RegisterDevices(  # noqa: N802
        self,
        request_iterator: Iterator[devices_pb2.RegisterDevicesRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[devices_pb2.RegisterDevicesResponse]:
        self._enter("RegisterDevices", context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the header")
        header = first.header
        self.register_headers.append(header)
        self._product(header.product, context)
        batch_key: bytes | None = None
        if header.transport_key_version:
            if header.transport_key_version != registration_key_version(header.product):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not the current registration key")
            try:
                batch_key = registration_private_key(header.product).decrypt(header.wrapped_batch_key, OAEP)
            except ValueError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the batch key does not decrypt")
        with self._lock:
            break_after = self.register_break_after.pop(0) if self.register_break_after else None
        identity = self.identities[-1] if self.identities else "insecure"
        arrived: queue.Queue[devices_pb2.RegisterDevicesRequest | None] = queue.Queue()
        counts = {"received": 0, "acked": 0}

        def read() -> None:  # lets the client run ahead of the acknowledgements, as far as it wants
            try:
                for request in request_iterator:
                    with self._lock:
                        counts["received"] += 1
                        self.max_unacked = max(self.max_unacked, counts["received"] - counts["acked"])
                    arrived.put(request)
            except Exception:  # noqa: BLE001, S110 -- the call ended
                pass
            finally:
                arrived.put(None)

        threading.Thread(target=read, daemon=True).start()
        committed = 0
        while (request := arrived.get()) is not None:
            if request.WhichOneof("part") != "devices" or len(request.devices.rows) > MAX_ROWS_PER_MESSAGE:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected DeviceRows of at most 1000 rows")
            self.message_sizes.append(len(request.devices.rows))
            response = devices_pb2.RegisterDevicesResponse()
            for row in request.devices.rows:
                self.wire_rows.append(row)
                outcome = self._register_row(header.product, row, batch_key, identity)
                if self.tamper == "ack-rows":
                    outcome.row += 1
                response.outcomes.append(outcome)
            committed += 1
            if committed == break_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "registry connection lost (fake)")
            if self.register_ack_delay:
                time.sleep(self.register_ack_delay)
            with self._lock:
                counts["acked"] += 1
            yield response

    def _register_row(
        self, product: str, row: devices_pb2.DeviceRow, batch_key: bytes | None, identity: str
    ) -> devices_pb2.RowOutcome:
        def reject(code: grpc.StatusCode, message: str) -> devices_pb2.RowOutcome:
            return devices_pb2.RowOutcome(
                row=row.row,
                device_id=row.device_id,
                status=devices_pb2.RowOutcome.REJECTED,
                code=code.value[0],
                message=message,
            )

        if not _DEVICE_ID.fullmatch(row.device_id):
            return reject(grpc.StatusCode.INVALID_ARGUMENT, f"malformed device id {row.device_id!r}")
        if row.chip not in CHIPS:
            return reject(grpc.StatusCode.INVALID_ARGUMENT, f"unknown chip {row.chip!r}")
        secret = row.secret
        if batch_key is not None:
            if len(secret) != 40:
                return reject(grpc.StatusCode.INVALID_ARGUMENT, "a wrapped secret is 40 bytes")
            try:
                secret = aes_key_unwrap(batch_key, secret)
            except InvalidUnwrap:
                return reject(grpc.StatusCode.INVALID_ARGUMENT, "the secret does not unwrap")
        if len(secret) != 32:
            return reject(grpc.StatusCode.INVALID_ARGUMENT, "a secret is 32 bytes")
        if row.ecies_public_key and len(row.ecies_public_key) not in (64, 65):
            return reject(grpc.StatusCode.INVALID_ARGUMENT, "an ECIES public key is 64 or 65 bytes")
        with self._lock:
            existing = self.devices.get(row.device_id)
            if existing is not None:
                if existing.secret != secret or existing.product != product:
                    return reject(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"device {row.device_id} is registered with another secret",
                    )
                status = devices_pb2.RowOutcome.UNCHANGED
            else:
                self.devices[row.device_id] = FakeDevice(
                    row.device_id,
                    product,
                    row.chip,
                    secret,
                    row.ecies_public_key or None,
                    registered_by=identity,
                )
                status = devices_pb2.RowOutcome.CREATED
        return devices_pb2.RowOutcome(row=row.row, device_id=row.device_id, status=status)

    def GetDevice(  # noqa: N802
        self, request: devices_pb2.GetDeviceRequest, context: grpc.ServicerContext
    ) -> devices_pb2.DeviceInfo:
        self._enter("GetDevice", context)
        return self._device_info(self._device(request.device_id, context))

    def RevokeDevice(  # noqa: N802
        self, request: devices_pb2.RevokeDeviceRequest, context: grpc.ServicerContext
    ) -> devices_pb2.DeviceInfo:
        self._enter("RevokeDevice", context)
        device = self._device(request.device_id, context)
        device.state = "revoked"
        return self._device_info(device)

    def _device(self, device_id: str, context: grpc.ServicerContext) -> FakeDevice:
        device = self.devices.get(device_id)
        if device is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no device {device_id!r}")
        return device

    @staticmethod
    def _device_info(device: FakeDevice) -> devices_pb2.DeviceInfo:
        info = devices_pb2.DeviceInfo(
            device_id=device.device_id,
            product=device.product,
            chip=device.chip,
            state=device.state,
            kek_version=f"keys/{device.product}-kek/versions/1",
            has_ecies_public_key=device.ecies_public_key is not None,
            registered_by=device.registered_by,
            secret_generation=1,
            secret_registered_by=device.registered_by,  # generation 1: the registration's, as the server
        )
        info.register_time.FromDatetime(datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC))
        info.secret_register_time.CopyFrom(info.register_time)
        return info

    def _product(self, product: str, context: grpc.ServicerContext) -> None:
        if product not in {key.product for key in KEYS.values()}:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown product {product!r}")

    # -- DistributionService -----------------------------------------------------------------------------

    def GetPayload(  # noqa: N802
        self, request: devices_pb2.GetPayloadRequest, context: grpc.ServicerContext
    ) -> Iterator[devices_pb2.GetPayloadResponse]:
        self._enter("GetPayload", context)
        self.payload_requests.append(request)
        device = self._device(request.device_id, context)
        release = RELEASES.get(request.release)
        if release is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no release {request.release!r}")
        if device.state != "active":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"device {device.device_id} is revoked")
        if release.product != device.product:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the release is for another product")
        if (
            request.HasField("device_secure_version")
            and request.device_secure_version > release.secure_version
        ):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the release is below the anti-rollback floor")
        payload_format = request.format or devices_pb2.FKSP_V1
        segment_size = 0
        if payload_format == devices_pb2.ESP_ENCRYPTED_IMG_ECIES:
            if device.ecies_public_key is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the device has no ECIES key")
        else:
            segment_size = request.segment_size or 4096
            if not 256 <= segment_size <= 1 << 20:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "segment size out of range")
        payload = payload_bytes(
            device.device_id, release.name, payload_format, segment_size, self.tamper == "payload-device"
        )
        if request.offset > len(payload):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset past the end ({len(payload)} bytes)")
        with self._lock:
            break_after = self.payload_break_after.pop(0) if self.payload_break_after else None
            end_after = self.payload_end_after.pop(0) if self.payload_end_after else None
        yield devices_pb2.GetPayloadResponse(
            info=devices_pb2.PayloadInfo(
                format=payload_format,
                total_size=len(payload),
                offset=request.offset,
                device_id=device.device_id,
                release=release.name,
                secure_version=release.secure_version,
                segment_size=segment_size,
                manifest_key_version="keys/thermostat-manifest/versions/1" if segment_size else "",
            )
        )
        if self.tamper == "payload-extra":
            payload += b"!"
        for sent, position in enumerate(range(request.offset, len(payload), PAYLOAD_CHUNK), start=1):
            yield devices_pb2.GetPayloadResponse(chunk=payload[position : position + PAYLOAD_CHUNK])
            if sent == break_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "distribution server restarting (fake)")
            if sent == end_after:
                return

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
_add_registry = cast(_AddServicer, devices_pb2_grpc.add_DeviceRegistryServiceServicer_to_server)
_add_distribution = cast(_AddServicer, devices_pb2_grpc.add_DistributionServiceServicer_to_server)


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
    _add_registry(fake, server)
    _add_distribution(fake, server)
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
