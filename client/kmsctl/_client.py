"""``KmsClient``: the calls a build server makes, with deadlines, retries and client-side integrity checks.

Every call has a deadline (``timeout`` seconds per attempt). A call that fails with UNAVAILABLE is repeated
under the client's ``RetryPolicy``; for image signing the whole stream is repeated, which is safe because
the server returns the stored release for an image it signed before.

Integrity, in the manner of Google Cloud KMS clients: a digest goes out with its CRC32C and the server must
say it checked it; a signature and a PEM come back with theirs, and the client recomputes them. An image goes
out with its size and SHA-256 in the header (the server refuses a mismatch), and the signed image that comes
back must have exactly ``release.output_size`` bytes hashing to ``release.output_sha256``. The eFuse key
digest of a public key is recomputed from the PEM. Any mismatch raises ``IntegrityError`` and nothing from
that response is returned or left on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from kmsapi.v1 import (
    common_pb2,
    devices_pb2,
    devices_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    signing_pb2,
    signing_pb2_grpc,
)
from kmsctl import _wire
from kmsctl._files import AtomicFile, ImageInput, ImageSource
from kmsctl._models import (
    DeviceInfo,
    DeviceRegistration,
    DigestSignature,
    EncodingName,
    HashName,
    KeyInfo,
    PayloadDownload,
    PayloadFormatName,
    ProgressCallback,
    PublicKeyInfo,
    RegistrationKeyInfo,
    RegistrationSummary,
    Release,
    RowOutcomeCallback,
    RowProgressCallback,
    SignedImage,
    TransportName,
)
from kmsctl._payload import MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE, Download, MemorySink, PartFile, release_name
from kmsctl._registration import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_WINDOW,
    MAX_ROWS_PER_MESSAGE,
    BatchKey,
    Registration,
    load_registration_key,
)
from kmsctl._retry import RetryPolicy, call_with_retry
from kmsctl._sbv2 import describe_public_key
from kmsctl._streams import ResumeBudget
from kmsctl.errors import IntegrityError, InvalidArgumentError

#: Bytes of image per upload message. The server accepts at most 256 KiB per chunk; 64-256 KiB messages
#: move about three times as fast as 16 KiB ones over gRPC in Python.
UPLOAD_CHUNK_SIZE = 256 * 1024
SECTOR_SIZE = 4096  # the Secure Boot V2 signature sector
#: Largest message the client sends: one chunk of the server's maximum plus protobuf framing.
MAX_SEND_MESSAGE_BYTES = 256 * 1024 + 1024
#: Largest message the client accepts (download chunks are 128 KiB; a key list may be longer).
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024

_DIGEST_SIZES: dict[str, int] = {"sha256": 32, "sha384": 48}
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
_T = TypeVar("_T")
_Message = TypeVar("_Message", bound=Message)
_Reply = TypeVar("_Reply", bound=Message)


class KmsClient:
    """A connection to the firmware KMS, authenticated with a client certificate (mutual TLS).

    ``ca_pem`` is the CA that issued the server's certificate; ``cert_pem`` and ``key_pem`` are the
    caller's certificate chain and private key. ``server_name_override`` checks the server certificate
    against that name instead of the host in ``target`` (for development certificates). ``timeout`` is the
    deadline of each attempt, in seconds. Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        ca_pem: bytes,
        cert_pem: bytes,
        key_pem: bytes,
        server_name_override: str | None = None,
        timeout: float = 30.0,
        retries: RetryPolicy | None = None,
    ) -> None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        options = _channel_options()
        if server_name_override:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        self._setup(target, grpc.secure_channel(target, credentials, options), timeout, retries)

    @classmethod
    def from_files(
        cls,
        target: str,
        *,
        ca: str | os.PathLike[str],
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        server_name_override: str | None = None,
        timeout: float = 30.0,
        retries: RetryPolicy | None = None,
    ) -> KmsClient:
        """A client whose CA, certificate and key are PEM files. Raises ``OSError`` if one cannot be read."""
        return cls(
            target,
            ca_pem=Path(ca).read_bytes(),
            cert_pem=Path(cert).read_bytes(),
            key_pem=Path(key).read_bytes(),
            server_name_override=server_name_override,
            timeout=timeout,
            retries=retries,
        )

    @classmethod
    def insecure_for_tests(
        cls, target: str, *, timeout: float = 30.0, retries: RetryPolicy | None = None
    ) -> KmsClient:
        """A client over plaintext with no identity. For tests against a local fake only: the service
        itself requires mutual TLS."""
        client = cls.__new__(cls)
        client._setup(target, grpc.insecure_channel(target, _channel_options()), timeout, retries)
        return client

    def _setup(self, target: str, channel: grpc.Channel, timeout: float, retries: RetryPolicy | None) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.target = target
        self._channel = channel
        self._timeout = timeout
        self._retries = retries or RetryPolicy()
        self._rng: random.Random = random.SystemRandom()
        # The generated, typed stubs (mypy-protobuf) name each RPC's path and (de)serializers.
        signing = signing_pb2_grpc.SigningServiceStub(channel)
        keys = keys_pb2_grpc.KeyServiceStub(channel)
        registry = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        self._sign_image = signing.SignImage
        self._sign_digest = signing.SignDigest
        self._get_public_key = keys.GetPublicKey
        self._list_keys = keys.ListKeys
        self._get_registration_key = registry.GetRegistrationKey
        self._register_devices = registry.RegisterDevices
        self._get_device = registry.GetDevice
        self._revoke_device = registry.RevokeDevice
        self._get_payload = devices_pb2_grpc.DistributionServiceStub(channel).GetPayload

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KmsClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- image signing -------------------------------------------------------------------------------

    def sign_image(
        self,
        product: str,
        image: ImageInput,
        *,
        progress: ProgressCallback | None = None,
        output: str | os.PathLike[str] | None = None,
    ) -> SignedImage:
        """Sign an ESP app image with every Secure Boot V2 key of ``product``.

        ``image`` is the image's bytes, a path to it, or a binary stream. Without ``output`` the signed
        image is returned in ``SignedImage.data``; with it, the signed image is streamed to a temporary
        file that replaces ``output`` only once its size and SHA-256 check out (``SignedImage.path``).
        ``progress(sent, total)`` reports the upload; it runs on a gRPC thread, restarts from 0 when the
        call is retried, and an exception it raises aborts the call and is re-raised.
        """
        source = ImageSource(image)
        # Only the signature sector comes back: the client rebuilds the signed image from its own upload
        # and checks it against the release's size and SHA-256 (half the transfer of the whole image).
        header = signing_pb2.SignImageHeader(
            product=product,
            image_size=source.size,
            image_sha256=source.sha256,
            content=signing_pb2.SIGNATURE_SECTOR,
        )

        def attempt() -> SignedImage:
            if output is None:
                memory = _MemorySink()
                release = self._sign_image_once(header, source, memory, progress)
                return SignedImage(release=release, data=memory.data(), path=None)
            with AtomicFile(output) as file:  # replaces `output` on success, removes itself on failure
                release = self._sign_image_once(header, source, file, progress)
            return SignedImage(release=release, data=None, path=Path(output))

        return self._with_retry(attempt)

    def _sign_image_once(
        self,
        header: signing_pb2.SignImageHeader,
        source: ImageSource,
        sink: _Sink,
        progress: ProgressCallback | None,
    ) -> Release:
        upload = _Upload(header, source, progress)
        call = self._sign_image(iter(upload), timeout=self._timeout)
        cancellable: _Cancellable = call
        try:
            return _receive_signed_image(call, source, sink)
        except grpc.RpcError as error:
            if upload.error is not None:
                raise upload.error from error
            raise _wire.translate(error) from error
        finally:
            cancellable.cancel()  # a no-op once the call has finished; stops the upload when a check failed

    # -- unary calls ---------------------------------------------------------------------------------

    def sign_digest(
        self,
        name: str,
        digest: bytes,
        *,
        hash: HashName = "sha256",
        encoding: EncodingName = "raw",
    ) -> DigestSignature:
        """Sign a digest with key ``name`` (``keys/ID``, its primary version signs) or a key version
        (``keys/ID/versions/N``). ``hash`` must be the key algorithm's (sha384 for P-384 keys).

        ``encoding`` "raw" gives r||s big-endian for ECDSA and the plain RSA-PSS signature; "der" gives an
        ASN.1 ECDSA signature as openssl expects (ECDSA keys only).
        """
        size = _DIGEST_SIZES.get(hash)
        if size is None:
            raise InvalidArgumentError(f"unknown hash {hash!r}; expected sha256 or sha384")
        if len(digest) != size:
            raise InvalidArgumentError(f"a {hash} digest is {size} bytes, not {len(digest)}")
        if encoding not in _wire.ENCODINGS:
            raise InvalidArgumentError(f"unknown encoding {encoding!r}; expected raw or der")
        digest_message = (
            common_pb2.Digest(sha256=digest) if hash == "sha256" else common_pb2.Digest(sha384=digest)
        )
        request = signing_pb2.SignDigestRequest(
            name=name,
            digest=digest_message,
            encoding=_wire.ENCODINGS[encoding],
            digest_crc32c=_wire.crc32c(digest),
        )
        response = self._unary(self._sign_digest, request)
        if not response.verified_digest_crc32c:
            raise IntegrityError(
                "the server did not confirm that it checked the digest's CRC32C; the signature is discarded"
            )
        if _wire.crc32c(response.signature) != response.signature_crc32c:
            raise IntegrityError("the signature was corrupted in transit (CRC32C mismatch)")
        if _wire.encoding(response.encoding) != encoding:
            raise IntegrityError(f"asked for a {encoding} signature, the server returned another encoding")
        return DigestSignature(
            signature=response.signature,
            key_version=response.key_version,
            algorithm=_wire.algorithm(response.algorithm),
            encoding=encoding,
        )

    def get_public_key(self, name: str) -> PublicKeyInfo:
        """The public key of ``keys/ID`` (its primary version) or ``keys/ID/versions/N``, with its Secure
        Boot V2 eFuse key digest (recomputed here and compared with the server's)."""
        response = self._unary(self._get_public_key, keys_pb2.GetPublicKeyRequest(name=name))
        if _wire.crc32c(response.pem.encode("utf-8")) != response.pem_crc32c:
            raise IntegrityError("the public key was corrupted in transit (CRC32C mismatch)")
        try:
            algorithm, key_digest = describe_public_key(response.pem)
        except ValueError as error:
            raise IntegrityError(f"the server returned an unusable public key: {error}") from error
        claimed = _wire.algorithm(response.algorithm)
        if claimed is not algorithm:
            raise IntegrityError(
                f"the server says the key is {claimed.value}, but its public key is {algorithm.value}"
            )
        if response.sbv2_key_digest and response.sbv2_key_digest != key_digest:
            raise IntegrityError(
                "the server's Secure Boot V2 key digest does not match its public key "
                f"(server {response.sbv2_key_digest.hex()}, computed {key_digest.hex()}); do not burn it"
            )
        return PublicKeyInfo(
            key_version=response.key_version,
            algorithm=algorithm,
            pem=response.pem,
            sbv2_key_digest=key_digest,
        )

    def list_keys(self, product: str | None = None) -> list[KeyInfo]:
        """Every key, or only ``product``'s, with its versions."""
        response = self._unary(self._list_keys, keys_pb2.ListKeysRequest(product=product or ""))
        return [_wire.key(key) for key in response.keys]

    # -- devices (factory stations, security officers) ------------------------------------------------

    def registration_key(self, product: str) -> RegistrationKeyInfo:
        """``product``'s registration transport key (RSA-3072, PEM) that batch keys are encrypted to.
        Raises ``IntegrityError`` if it is not an RSA key of at least 3072 bits."""
        response = self._unary(
            self._get_registration_key, devices_pb2.GetRegistrationKeyRequest(product=product)
        )
        info = RegistrationKeyInfo(key_version=response.key_version, pem=response.pem)
        load_registration_key(info)
        return info

    def register_devices(
        self,
        product: str,
        rows: Iterable[DeviceRegistration],
        *,
        transport: TransportName = "wrapped",
        batch_size: int = DEFAULT_BATCH_SIZE,
        window: int = DEFAULT_WINDOW,
        progress: RowProgressCallback | None = None,
        on_outcome: RowOutcomeCallback | None = None,
    ) -> RegistrationSummary:
        """Register devices of ``product`` with their eFuse secrets, in one stream of any length.

        ``transport`` "wrapped" (the default) wraps every secret under a random batch key that only the
        server's HSM can unwrap (see ``registration_key``); "plain" sends the secrets as they are, protected
        by mutual TLS only. Rows go out ``batch_size`` (1-1000) to a message with at most ``window``
        messages unacknowledged, so ``rows`` may be a generator over millions of rows and is read only as
        fast as the server commits them. When the stream breaks with UNAVAILABLE the call reconnects and
        resumes at the first unacknowledged row (registering a row again is a no-op on the server); the
        client's ``RetryPolicy`` bounds the attempts in a row that make no progress.

        A row the server refuses does not fail the call: it is in ``RegistrationSummary.rejected`` with
        the status name (``ALREADY_EXISTS`` when the device is registered with another secret) and the
        server's message. For each acknowledged message, ``on_outcome(outcome)`` is called for each of its
        rows in order, then ``progress(rows_done, len(rows) or None)``; both run on the caller's thread (an
        exception they raise ends the call), and ``progress(0, ...)`` is called first. A whole-stream
        failure (unknown product, permission, retries exhausted) raises; rows acknowledged before it are
        registered and were reported to the callbacks.
        """
        if transport not in ("wrapped", "plain"):
            raise InvalidArgumentError(f"unknown transport {transport!r}; expected wrapped or plain")
        if not 1 <= batch_size <= MAX_ROWS_PER_MESSAGE:
            raise InvalidArgumentError(f"batch_size must be 1-{MAX_ROWS_PER_MESSAGE}, not {batch_size}")
        if window < 1:
            raise InvalidArgumentError("window must be at least 1")
        header = devices_pb2.RegisterDevicesHeader(product=product)
        batch_key: BatchKey | None = None
        if transport == "wrapped":
            batch_key = BatchKey(self.registration_key(product))
            header.transport_key_version = batch_key.key_version
            header.wrapped_batch_key = batch_key.wrapped
        try:
            return Registration(
                self._register_devices,
                header,
                rows,
                batch_key,
                batch_size=batch_size,
                window=window,
                progress=progress,
                on_outcome=on_outcome,
                budget=ResumeBudget(self._retries, self._rng),
                idle_timeout=self._timeout,
            ).run()
        finally:
            if batch_key is not None:
                batch_key.wipe()
                del batch_key

    def device(self, device_id: str) -> DeviceInfo:
        """A registered device (never its secret). ``NotFoundError`` if there is none."""
        return _wire.device_info(
            self._unary(self._get_device, devices_pb2.GetDeviceRequest(device_id=device_id))
        )

    def revoke_device(self, device_id: str) -> DeviceInfo:
        """Revoke a device: it gets no payload from now on. Revoking a revoked device is a no-op."""
        request = devices_pb2.RevokeDeviceRequest(device_id=device_id)
        return _wire.device_info(self._unary(self._revoke_device, request))

    # -- payloads (distribution servers) --------------------------------------------------------------

    def get_payload(
        self,
        device_id: str,
        release: str,
        *,
        format: PayloadFormatName = "fksp",
        segment_size: int | None = None,
        device_secure_version: int | None = None,
        output: str | os.PathLike[str] | None = None,
        offset: int = 0,
        resume: bool = False,
        progress: ProgressCallback | None = None,
    ) -> PayloadDownload:
        """Download the payload of ``release`` (``releases/{hex}`` or the bare hex) sealed for ``device_id``.

        ``format`` "fksp" is the sealed format of docs/sealed-payload-v1.md (``segment_size``: plaintext
        bytes per segment, 256-1048576, default 4096); "esp-encrypted-img" is Espressif's pre-encrypted
        OTA format (the device needs a registered ECIES key). ``device_secure_version`` makes the server
        refuse a release below the device's anti-rollback floor (``FailedPreconditionError``).

        Without ``output`` the payload bytes from ``offset`` on are returned in ``data``. With it, they go
        to ``OUTPUT.part``, renamed to ``output`` once complete; with ``resume`` an existing ``.part`` is
        continued (after checking that its last bytes match). A stream that breaks (UNAVAILABLE, or ends
        early) is resumed at the byte it reached, under the client's ``RetryPolicy`` (attempts in a row
        without progress). The total size is checked, and so is the payload's header (FKSP: layout, device
        id, the release's image SHA-256; esp_encrypted_img: magic and size); a mismatch raises
        ``IntegrityError`` and removes the ``.part``. After any other failure (UNAVAILABLE after the
        retries, DEADLINE_EXCEEDED, a refusal, an interruption) a non-empty ``.part`` is kept for a resumed
        call. ``progress(position, total_size)`` runs on the caller's thread.
        """
        wire_format = _wire.PAYLOAD_FORMATS.get(format)
        if wire_format is None:
            raise InvalidArgumentError(
                f"unknown payload format {format!r}; expected fksp or esp-encrypted-img"
            )
        if segment_size is not None:
            if format != "fksp":
                raise InvalidArgumentError("segment_size applies to the fksp format only")
            if not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
                raise InvalidArgumentError(
                    f"segment_size must be {MIN_SEGMENT_SIZE}-{MAX_SEGMENT_SIZE}, not {segment_size}"
                )
        if device_secure_version is not None and not 0 <= device_secure_version < 1 << 32:
            raise InvalidArgumentError("device_secure_version must be a 32-bit unsigned number")
        if offset < 0:
            raise InvalidArgumentError("offset must not be negative")
        if offset and output is not None:
            raise InvalidArgumentError("offset applies to downloads into memory; use resume with output")
        request = devices_pb2.GetPayloadRequest(
            device_id=device_id,
            release=release_name(release),
            format=wire_format,
            segment_size=segment_size or 0,
        )
        if device_secure_version is not None:
            request.device_secure_version = device_secure_version
        expected_format = _wire.payload_format(wire_format)
        budget = ResumeBudget(self._retries, self._rng)

        def download(sink: MemorySink | PartFile) -> PayloadDownload:
            info = Download(
                self._get_payload,
                request,
                expected_format,
                sink,
                progress=progress,
                budget=budget,
                idle_timeout=self._timeout,
            ).run()
            return PayloadDownload(
                info=info, data=None, path=None, start_offset=sink.start, resumes=budget.resumes
            )

        if output is None:
            memory = MemorySink(offset)
            result = download(memory)
            return dataclasses.replace(result, data=memory.data())
        part = PartFile(output, resume=resume)
        try:
            result = download(part)
            part.commit()
        except IntegrityError:
            part.discard()  # its content cannot be trusted
            raise
        except BaseException:
            part.close()  # kept for a resumed call, unless empty
            raise
        return dataclasses.replace(result, path=part.output)

    # -- any other unary RPC ---------------------------------------------------------------------------

    def call_unary(
        self, method: str, request: _Message, reply: type[_Reply], *, retry: bool = False
    ) -> _Reply:
        """Call the unary RPC at ``method`` (its path, ``/kmsapi.v1.Service/Method``: ``_wire.method_path``)
        over this connection, with this client's deadline, and return its ``reply``; a gRPC error becomes
        its ``KmsClientError``. The officer commands (``kmsctl._officer_cli``) reach the RPCs this class has
        no method for through it.

        Called once unless ``retry``: a repeated request for approval would make a second request, a
        repeated KEK rotation would rotate again. ``retry=True`` is for reads, retried on UNAVAILABLE like
        every read of this class.
        """
        rpc: grpc.UnaryUnaryMultiCallable[_Message, _Reply] = self._channel.unary_unary(
            method, request_serializer=type(request).SerializeToString, response_deserializer=reply.FromString
        )
        if retry:
            return self._unary(rpc, request)
        try:
            return rpc(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise _wire.translate(error) from error

    def _unary(self, rpc: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request) -> _Response:
        def attempt() -> _Response:
            try:
                return rpc(request, timeout=self._timeout)
            except grpc.RpcError as error:
                raise _wire.translate(error) from error

        return self._with_retry(attempt)

    def _with_retry(self, attempt: Callable[[], _T]) -> _T:
        return call_with_retry(attempt, self._retries, rng=self._rng)


def _channel_options() -> list[tuple[str, str | int]]:
    return [
        ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ("grpc.primary_user_agent", "kmsctl"),
    ]


class _Cancellable(Protocol):
    def cancel(self) -> bool: ...


class _Sink(Protocol):
    """Where the signed image goes while it downloads: memory, or an ``AtomicFile``."""

    def write(self, data: bytes) -> None: ...


class _MemorySink:
    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def data(self) -> bytes:
        return b"".join(self._parts)


class _Upload:
    """The request stream of one SignImage attempt: the header, then the image in chunks.

    gRPC consumes it on its own thread and turns an exception raised here into a cancelled call, so the
    exception is kept in ``error`` for the caller to re-raise instead of the CANCELLED status.
    """

    def __init__(
        self,
        header: signing_pb2.SignImageHeader,
        source: ImageSource,
        progress: ProgressCallback | None,
    ) -> None:
        self._header = header
        self._source = source
        self._progress = progress
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[signing_pb2.SignImageRequest]:
        try:
            yield signing_pb2.SignImageRequest(header=self._header)
            total = self._source.size
            sent = 0
            if self._progress is not None:
                self._progress(sent, total)
            for chunk in self._source.chunks(UPLOAD_CHUNK_SIZE):
                yield signing_pb2.SignImageRequest(chunk=chunk)
                sent += len(chunk)
                if self._progress is not None:
                    self._progress(sent, total)
        except Exception as error:
            self.error = error
            raise


def _receive_signed_image(
    responses: Iterable[signing_pb2.SignImageResponse], source: ImageSource, sink: _Sink
) -> Release:
    """Read ``release`` then the signature sector; write the signed image (the uploaded image, 0xFF
    padding, the sector) into ``sink``, checking order, size and SHA-256 of the whole."""
    input_sha256 = source.sha256
    release: signing_pb2.Release | None = None
    hasher = hashlib.sha256()
    received = 0
    for response in responses:
        part = response.WhichOneof("part")
        if part == "release":
            if release is not None:
                raise IntegrityError("the server sent a second release in one response stream")
            release = response.release
            if not release.output_sha256:
                raise IntegrityError("the server's release has no output_sha256; the image cannot be checked")
            if release.input_sha256 and release.input_sha256 != input_sha256:
                raise IntegrityError(
                    f"the server signed an image with SHA-256 {release.input_sha256.hex()}, "
                    f"not the one sent ({input_sha256.hex()})"
                )
            padded = source.size + (-source.size % SECTOR_SIZE)
            if release.output_size != padded + SECTOR_SIZE:
                raise IntegrityError(
                    f"the release announces {release.output_size} bytes; a signed image of this upload has "
                    f"{padded + SECTOR_SIZE}"
                )
            for piece in source.chunks(UPLOAD_CHUNK_SIZE):
                hasher.update(piece)
                sink.write(piece)
            padding = b"\xff" * (padded - source.size)
            hasher.update(padding)
            sink.write(padding)
            received = padded
        elif part == "chunk":
            if release is None:
                raise IntegrityError("the server sent image bytes before the release")
            received += len(response.chunk)
            if received > release.output_size:
                raise IntegrityError(
                    f"the server sent more than the {release.output_size} bytes its release announced"
                )
            hasher.update(response.chunk)
            sink.write(response.chunk)
        else:
            raise IntegrityError("the server sent an empty response message")
    if release is None:
        raise IntegrityError("the server ended the call without a release")
    if received != release.output_size:
        raise IntegrityError(
            f"the signed image is incomplete: {received} of {release.output_size} bytes received"
        )
    if hasher.digest() != release.output_sha256:
        raise IntegrityError(
            "the signed image does not match its release: SHA-256 "
            f"{hasher.hexdigest()} received, {release.output_sha256.hex()} announced"
        )
    return _wire.release(release)
