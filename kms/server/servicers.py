"""gRPC servicers. Each method parses the request, calls one use case, and builds the response.

Error handling is ``translate_errors``; authorization is the interceptor in ``kms.server.auth``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import google_crc32c
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain import sbv2
from kms.domain.errors import DataLoss, InvalidArgument, LimitExceeded
from kms.domain.keys import Algorithm, HashAlgorithm, Key, KeyPurpose, KeyVersion, KeyVersionState
from kms.domain.releases import Release
from kms.domain.signatures import SignatureEncoding
from kms.server.audit_interceptor import note
from kms.server.auth import caller_of
from kms.server.errors import translate_errors
from kms.service.rollover import ManifestKeyRollovers
from kms.service.signing import SigningService
from kmsapi.v1 import common_pb2, keys_pb2, keys_pb2_grpc, signing_pb2, signing_pb2_grpc

if TYPE_CHECKING:
    from hashlib import _Hash as HashObject

MAX_UPLOAD_CHUNK = 256 * 1024
DOWNLOAD_CHUNK = 128 * 1024

ALGORITHMS = {
    Algorithm.ECDSA_P256_SHA256: common_pb2.ECDSA_P256_SHA256,
    Algorithm.ECDSA_P384_SHA384: common_pb2.ECDSA_P384_SHA384,
    Algorithm.RSA_3072_PSS_SHA256: common_pb2.RSA_3072_PSS_SHA256,
}
ENCODINGS = {
    common_pb2.SIGNATURE_ENCODING_UNSPECIFIED: SignatureEncoding.RAW,
    common_pb2.RAW: SignatureEncoding.RAW,
    common_pb2.DER: SignatureEncoding.DER,
}
ENCODINGS_PB = {SignatureEncoding.RAW: common_pb2.RAW, SignatureEncoding.DER: common_pb2.DER}
STATES = {
    KeyVersionState.ENABLED: common_pb2.ENABLED,
    KeyVersionState.DISABLED: common_pb2.DISABLED,
    KeyVersionState.DESTROY_SCHEDULED: common_pb2.DESTROY_SCHEDULED,
    KeyVersionState.DESTROYED: common_pb2.DESTROYED,
}
PURPOSES = {
    KeyPurpose.SECURE_BOOT_V2: common_pb2.SECURE_BOOT_V2,
    KeyPurpose.DIGEST_SIGNING: common_pb2.DIGEST_SIGNING,
    KeyPurpose.OTA_MANIFEST: common_pb2.OTA_MANIFEST,
    KeyPurpose.KEY_ENCRYPTION: common_pb2.KEY_ENCRYPTION,
    KeyPurpose.REGISTRATION_TRANSPORT: common_pb2.REGISTRATION_TRANSPORT,
    KeyPurpose.PAYLOAD_SEED: common_pb2.PAYLOAD_SEED,
    KeyPurpose.AUDIT_CHECKPOINT: common_pb2.AUDIT_CHECKPOINT,
}


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


def _timestamp(value: object) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)  # type: ignore[arg-type]
    return ts


def release_pb(release: Release, reused: bool) -> signing_pb2.Release:
    return signing_pb2.Release(
        name=release.name,
        product=release.product,
        chip=release.chip,
        version=release.version,
        secure_version=release.secure_version,
        project_name=release.project_name,
        input_sha256=release.input_sha256,
        output_sha256=release.output_sha256,
        output_size=release.output_size,
        key_versions=list(release.key_versions),
        signed_by=release.signed_by,
        create_time=_timestamp(release.created_at),
        reused=reused,
    )


@dataclass(frozen=True)
class ReceivedImage:
    header: signing_pb2.SignImageHeader
    data: bytes
    sha256: HashObject  # fed exactly ``data``


def receive_image(requests: Iterable[signing_pb2.SignImageRequest], max_size: int) -> ReceivedImage:
    """Read a header then chunks, hashing as they come; enforce the size limit before buffering anything."""
    stream = iter(requests)
    first = next(stream, None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first SignImage message must carry the header (product, image_size)")
    header = first.header
    if header.image_size == 0:
        raise InvalidArgument("header.image_size must be the exact size of the image, in bytes")
    if header.image_size > max_size:
        raise LimitExceeded(
            f"image of {header.image_size} bytes exceeds this server's limit of {max_size} bytes"
        )
    if header.image_sha256 and len(header.image_sha256) != 32:
        raise InvalidArgument("header.image_sha256, when set, must be 32 bytes")
    image = bytearray()
    hashed = hashlib.sha256()
    for message in stream:
        if message.WhichOneof("part") != "chunk":
            raise InvalidArgument(
                "only the first SignImage message may carry a header; the rest carry chunks"
            )
        if len(message.chunk) > MAX_UPLOAD_CHUNK:
            raise InvalidArgument(
                f"chunk of {len(message.chunk)} bytes exceeds the {MAX_UPLOAD_CHUNK}-byte chunk limit"
            )
        if len(image) + len(message.chunk) > header.image_size:
            raise InvalidArgument(f"the stream carries more than the announced {header.image_size} bytes")
        image += message.chunk
        hashed.update(message.chunk)
    if len(image) != header.image_size:
        raise InvalidArgument(
            f"the stream ended after {len(image)} of the announced {header.image_size} bytes"
        )
    if header.image_sha256 and hashed.digest() != header.image_sha256:
        raise DataLoss("the image received does not match header.image_sha256; it was corrupted on the way")
    return ReceivedImage(header, bytes(image), hashed)


class SigningServicer(signing_pb2_grpc.SigningServiceServicer):
    def __init__(self, signing: SigningService) -> None:
        self._signing = signing

    @translate_errors
    def SignImage(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterable[signing_pb2.SignImageRequest], context: grpc.ServicerContext
    ) -> Iterator[signing_pb2.SignImageResponse]:
        caller = caller_of(context)
        received = receive_image(request_iterator, self._signing.max_image_size)
        note(product=received.header.product)
        signed = self._signing.sign_image(caller, received.header.product, received.data, received.sha256)
        note(resource=signed.release.name, key_version=",".join(signed.release.key_versions))
        data = signed.data if signed.data is not None else self._signing.read_release(signed.release)
        yield signing_pb2.SignImageResponse(release=release_pb(signed.release, signed.reused))
        if received.header.content == signing_pb2.SIGNATURE_SECTOR:
            yield signing_pb2.SignImageResponse(chunk=data[-sbv2.SECTOR_SIZE :])
            return
        view = memoryview(data)
        for offset in range(0, len(view), DOWNLOAD_CHUNK):
            yield signing_pb2.SignImageResponse(chunk=bytes(view[offset : offset + DOWNLOAD_CHUNK]))

    @translate_errors
    def SignDigest(  # noqa: N802 - gRPC method name
        self, request: signing_pb2.SignDigestRequest, context: grpc.ServicerContext
    ) -> signing_pb2.SignDigestResponse:
        caller = caller_of(context)
        note(resource=request.name)
        which = request.digest.WhichOneof("digest")
        if which is None:
            raise InvalidArgument("digest is required: set digest.sha256 or digest.sha384")
        digest: bytes = getattr(request.digest, which)
        checked = request.HasField("digest_crc32c")
        if checked and crc32c(digest) != request.digest_crc32c:
            raise InvalidArgument(
                "digest_crc32c does not match the digest: it was corrupted on the way; retry"
            )
        encoding = ENCODINGS.get(request.encoding)
        if encoding is None:
            raise InvalidArgument(f"unknown signature encoding {request.encoding}")
        hash_algorithm = HashAlgorithm.SHA256 if which == "sha256" else HashAlgorithm.SHA384
        result = self._signing.sign_digest(caller, request.name, digest, hash_algorithm, encoding)
        note(key_version=result.key_version.name)
        return signing_pb2.SignDigestResponse(
            signature=result.signature,
            signature_crc32c=crc32c(result.signature),
            verified_digest_crc32c=checked,
            key_version=result.key_version.name,
            algorithm=ALGORITHMS[result.key_version.algorithm],
            encoding=ENCODINGS_PB[result.encoding],
        )


def key_pb(key: Key) -> keys_pb2.Key:
    return keys_pb2.Key(
        name=key.name,
        product=key.product,
        purpose=PURPOSES[key.purpose],
        algorithm=ALGORITHMS.get(key.algorithm, common_pb2.SIGNATURE_ALGORITHM_UNSPECIFIED),
        algorithm_name=key.algorithm.value,
        sbv2_slot=-1 if key.sbv2_slot is None else key.sbv2_slot,
        primary_version=key.version().name,
        versions=[
            keys_pb2.KeyVersion(name=v.name, state=STATES[v.state], create_time=_timestamp(v.created_at))
            for v in key.versions
        ],
    )


def public_key_pb(version: KeyVersion) -> keys_pb2.PublicKey:
    pem = version.public_key_pem
    return keys_pb2.PublicKey(
        key_version=version.name,
        algorithm=ALGORITHMS.get(version.algorithm, common_pb2.SIGNATURE_ALGORITHM_UNSPECIFIED),
        pem=pem,
        pem_crc32c=crc32c(pem.encode("ascii")),
        sbv2_key_digest=(
            sbv2.key_digest(version.algorithm, version.public_key_der)
            if version.algorithm.is_signing
            else b""
        ),
    )


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):
    def __init__(self, signing: SigningService, rollovers: ManifestKeyRollovers) -> None:
        self._signing = signing
        self._rollovers = rollovers

    @translate_errors
    def GetPublicKey(  # noqa: N802 - gRPC method name
        self, request: keys_pb2.GetPublicKeyRequest, context: grpc.ServicerContext
    ) -> keys_pb2.PublicKey:
        note(resource=request.name)
        key, version = self._signing.public_key(request.name)
        note(product=key.product, key_version=version.name)
        return public_key_pb(version)

    @translate_errors
    def ListKeys(  # noqa: N802 - gRPC method name
        self, request: keys_pb2.ListKeysRequest, context: grpc.ServicerContext
    ) -> keys_pb2.ListKeysResponse:
        note(product=request.product)
        keys = self._signing.list_keys(request.product, caller_of(context))
        return keys_pb2.ListKeysResponse(keys=[key_pb(k) for k in keys])

    @translate_errors
    def GetManifestKeyRollover(  # noqa: N802 - gRPC method name
        self, request: keys_pb2.GetManifestKeyRolloverRequest, context: grpc.ServicerContext
    ) -> keys_pb2.GetManifestKeyRolloverResponse:
        # At most the 32 bytes of a key id go into the audit record; a longer value is refused below.
        note(product=request.product, resource=f"manifest-key-id/{request.trusted_key_id[:32].hex()}")
        chain = self._rollovers.chain(caller_of(context), request.product, request.trusted_key_id)
        note(resource=chain.key.name, key_version=chain.current.name)
        response = keys_pb2.GetManifestKeyRolloverResponse(
            current_version=chain.current.name, current_key_id=chain.current_key_id
        )
        for stored in chain.statements:
            body = stored.stored_statement().body  # DATA_LOSS if the stored bytes are corrupt
            response.statements.add(
                statement=stored.statement,
                from_version=stored.from_name,
                to_version=stored.to_name,
                from_key_id=body.from_key_id,
                to_key_id=body.to_key_id,
                create_time=_timestamp(stored.created_at),
            )
        return response
