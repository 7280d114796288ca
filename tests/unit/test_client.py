"""The kmsctl client library against the fake KMS over a real gRPC server on loopback."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from kmsctl import (
    UPLOAD_CHUNK_SIZE,
    Algorithm,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    KeyPurpose,
    KeyVersionState,
    KmsClient,
    KmsClientError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryPolicy,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from tests.support import fake_kms
from tests.support.fake_kms import FakeKms, RunningServer, Tamper, signed_image

FAST_RETRIES = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005)
# 3 full chunks and a partial one.
IMAGE = bytes(range(256)) * (UPLOAD_CHUNK_SIZE * 3 // 256) + b"tail of the image"


@pytest.fixture
def served() -> Iterator[RunningServer]:
    running = fake_kms.start(FakeKms())
    yield running
    running.stop()


@pytest.fixture
def fake(served: RunningServer) -> FakeKms:
    return served.fake


@pytest.fixture
def client(served: RunningServer) -> Iterator[KmsClient]:
    with KmsClient.insecure_for_tests(served.target, timeout=5.0, retries=FAST_RETRIES) as kms:
        yield kms


def leftovers(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(".tmp"))


# -- sign_image ------------------------------------------------------------------------------------------


def test_sign_image_streams_header_then_256k_chunks_and_returns_the_checked_image(
    client: KmsClient, fake: FakeKms
) -> None:
    result = client.sign_image("thermostat", IMAGE)

    assert result.data == signed_image(IMAGE)
    assert result.path is None
    release = result.release
    assert release.output_sha256 == hashlib.sha256(signed_image(IMAGE)).digest()
    assert release.input_sha256 == hashlib.sha256(IMAGE).digest()
    assert release.name == f"releases/{release.output_sha256.hex()}"
    assert (release.chip, release.version, release.secure_version) == ("esp32s3", "1.2.3", 4)
    assert release.key_versions == ("keys/thermostat-sb0/versions/2", "keys/thermostat-sb1/versions/1")
    assert release.create_time is not None and release.create_time.year == 2025
    assert not release.reused
    [header] = fake.headers
    assert header.product == "thermostat"
    assert header.image_size == len(IMAGE)
    assert header.image_sha256 == hashlib.sha256(IMAGE).digest()
    assert fake.chunk_sizes == [UPLOAD_CHUNK_SIZE] * 3 + [len(b"tail of the image")]


def test_sign_image_accepts_a_path_a_seekable_stream_and_a_pipe(
    client: KmsClient, fake: FakeKms, tmp_path: Path
) -> None:
    image_file = tmp_path / "app.bin"
    image_file.write_bytes(IMAGE)
    seekable = io.BytesIO(b"prefix" + IMAGE)
    seekable.seek(len(b"prefix"))
    pipe = io.BufferedReader(io.BytesIO(IMAGE))
    pipe.seekable = lambda: False  # type: ignore[method-assign]

    for image in (image_file, str(image_file), seekable, pipe):
        assert client.sign_image("thermostat", image).data == signed_image(IMAGE)
    assert [header.image_sha256 for header in fake.headers] == [hashlib.sha256(IMAGE).digest()] * 4


def test_sign_image_to_a_file_writes_it_atomically(client: KmsClient, tmp_path: Path) -> None:
    output = tmp_path / "signed.bin"
    output.write_bytes(b"previous release")

    result = client.sign_image("thermostat", IMAGE, output=output)

    assert result.data is None
    assert result.path == output
    assert output.read_bytes() == signed_image(IMAGE)
    assert leftovers(tmp_path) == []


def test_signing_again_reports_the_reused_release(client: KmsClient) -> None:
    first = client.sign_image("thermostat", IMAGE)
    second = client.sign_image("thermostat", IMAGE)
    assert second.release.reused and second.release.name == first.release.name


def test_progress_reports_every_chunk_from_zero_to_the_image_size(client: KmsClient) -> None:
    calls: list[tuple[int, int]] = []
    client.sign_image("thermostat", IMAGE, progress=lambda sent, total: calls.append((sent, total)))
    assert calls == [(0, len(IMAGE))] + [
        (min(n * UPLOAD_CHUNK_SIZE, len(IMAGE)), len(IMAGE)) for n in range(1, 5)
    ]


def test_an_exception_in_the_progress_callback_aborts_and_is_reraised(client: KmsClient) -> None:
    def progress(sent: int, total: int) -> None:
        if sent > 0:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        client.sign_image("thermostat", IMAGE, progress=progress)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("output-sha256", "does not match its release"),
        ("flip-byte", "does not match its release"),
        ("truncate", "incomplete"),
        ("extra-byte", "more than"),
        ("chunk-first", "before the release"),
        ("no-release", "without a release"),
        ("input-sha256", "not the one sent"),
    ],
)
def test_a_tampered_signed_image_raises_and_leaves_no_file(
    client: KmsClient, fake: FakeKms, tmp_path: Path, tamper: Tamper, message: str
) -> None:
    fake.tamper = tamper
    output = tmp_path / "signed.bin"
    with pytest.raises(IntegrityError, match=message) as raised:
        client.sign_image("thermostat", IMAGE, output=output)
    assert isinstance(raised.value, DataLossError)
    assert list(tmp_path.iterdir()) == []
    assert fake.calls == ["SignImage"], "integrity failures are not retried"


def test_a_tampered_image_does_not_replace_an_existing_output(
    client: KmsClient, fake: FakeKms, tmp_path: Path
) -> None:
    fake.tamper = "flip-byte"
    output = tmp_path / "signed.bin"
    output.write_bytes(b"previous release")
    with pytest.raises(IntegrityError):
        client.sign_image("thermostat", IMAGE, output=output)
    assert output.read_bytes() == b"previous release"
    assert leftovers(tmp_path) == []


# -- retries and deadlines -------------------------------------------------------------------------------


def test_unavailable_is_retried_until_it_succeeds(client: KmsClient, fake: FakeKms) -> None:
    fake.fail_unavailable = 2
    assert client.sign_image("thermostat", IMAGE).data == signed_image(IMAGE)
    assert fake.calls == ["SignImage"] * 3


def test_unavailable_in_the_middle_of_the_download_restarts_the_whole_stream(
    client: KmsClient, fake: FakeKms, tmp_path: Path
) -> None:
    fake.fail_mid_stream = 1
    progress: list[int] = []
    output = tmp_path / "signed.bin"
    client.sign_image("thermostat", IMAGE, output=output, progress=lambda sent, _: progress.append(sent))
    assert output.read_bytes() == signed_image(IMAGE)
    assert leftovers(tmp_path) == []
    assert fake.calls == ["SignImage"] * 2
    assert progress.count(0) == 2, "progress restarts with the retried stream"


def test_unavailable_gives_up_after_the_policy_attempts(client: KmsClient, fake: FakeKms) -> None:
    fake.fail_unavailable = 10
    with pytest.raises(UnavailableError, match=r"HSM unreachable \(fake\) \(after 3 attempts\)"):
        client.list_keys()
    assert fake.calls == ["ListKeys"] * 3


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, NotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
        (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
        (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
        (grpc.StatusCode.DATA_LOSS, DataLossError),
        (grpc.StatusCode.INTERNAL, ServerError),
    ],
)
def test_other_statuses_map_to_their_error_and_are_not_retried(
    client: KmsClient, fake: FakeKms, status: grpc.StatusCode, error_type: type[KmsClientError]
) -> None:
    fake.abort_with = (status, "the server's own words")
    for call in (lambda: client.sign_image("thermostat", IMAGE), lambda: client.get_public_key("keys/x")):
        with pytest.raises(error_type) as raised:
            call()
        assert raised.value.message == "the server's own words"
        assert raised.value.code == status.name
        assert isinstance(raised.value.__cause__, grpc.RpcError)
    assert fake.calls == ["SignImage", "GetPublicKey"]


def test_a_call_past_its_deadline_raises_and_is_not_retried(served: RunningServer) -> None:
    served.fake.delay = 1.0
    with (
        KmsClient.insecure_for_tests(served.target, timeout=0.2, retries=FAST_RETRIES) as kms,
        pytest.raises(DeadlineExceededError),
    ):
        kms.sign_digest("keys/thermostat-sb0", bytes(32))
    assert served.fake.calls == ["SignDigest"]


def test_no_server_listening_is_unavailable() -> None:
    running = fake_kms.start(FakeKms())
    target = running.target
    running.stop()
    with KmsClient.insecure_for_tests(target, timeout=2.0, retries=FAST_RETRIES) as kms:
        with pytest.raises(UnavailableError, match="after 3 attempts"):
            kms.list_keys()
        with pytest.raises(UnavailableError):
            kms.sign_image("thermostat", IMAGE)


def test_a_closed_client_refuses_calls(served: RunningServer) -> None:
    kms = KmsClient.insecure_for_tests(served.target)
    kms.close()
    with pytest.raises(ValueError, match="closed channel"):
        kms.list_keys()


# -- sign_digest -----------------------------------------------------------------------------------------


def verify(
    key_version: str, signature_der: bytes, digest: bytes, hash_algorithm: hashes.HashAlgorithm
) -> None:
    key = fake_kms.private_key(key_version).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature_der, digest, ec.ECDSA(utils.Prehashed(hash_algorithm)))


def test_sign_digest_sends_the_crc32c_and_returns_a_raw_or_der_signature(
    client: KmsClient, fake: FakeKms
) -> None:
    digest = hashlib.sha256(b"artifact").digest()

    raw = client.sign_digest("keys/thermostat-sb0", digest)
    der = client.sign_digest("keys/thermostat-sb0", digest, encoding="der")

    assert (raw.key_version, raw.algorithm, raw.encoding) == (
        "keys/thermostat-sb0/versions/2",
        Algorithm.ECDSA_P256_SHA256,
        "raw",
    )
    assert len(raw.signature) == 64
    r, s = int.from_bytes(raw.signature[:32], "big"), int.from_bytes(raw.signature[32:], "big")
    verify(raw.key_version, utils.encode_dss_signature(r, s), digest, hashes.SHA256())
    assert der.encoding == "der"
    verify(der.key_version, der.signature, digest, hashes.SHA256())
    for request in fake.digest_requests:
        assert request.HasField("digest_crc32c")
        assert request.digest_crc32c == fake_kms.crc32c(digest)


def test_sign_digest_with_sha384(client: KmsClient) -> None:
    digest = hashlib.sha384(b"artifact").digest()
    result = client.sign_digest("keys/artifacts", digest, hash="sha384", encoding="der")
    assert result.algorithm is Algorithm.ECDSA_P384_SHA384
    verify(result.key_version, result.signature, digest, hashes.SHA384())


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("signature-crc", "CRC32C mismatch"),
        ("unverified", "did not confirm"),
        ("encoding", "another encoding"),
    ],
)
def test_sign_digest_integrity_failures_raise(
    client: KmsClient, fake: FakeKms, tamper: Tamper, message: str
) -> None:
    fake.tamper = tamper
    with pytest.raises(IntegrityError, match=message):
        client.sign_digest("keys/thermostat-sb0", bytes(32))


@pytest.mark.parametrize(
    ("digest", "hash_name", "message"),
    [
        (bytes(31), "sha256", "32 bytes, not 31"),
        (bytes(32), "sha384", "48 bytes, not 32"),
        (b"", "md5", "md5"),
    ],
)
def test_sign_digest_refuses_a_malformed_digest_before_calling(
    client: KmsClient, fake: FakeKms, digest: bytes, hash_name: str, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        client.sign_digest("keys/thermostat-sb0", digest, hash=hash_name)  # type: ignore[arg-type]
    assert fake.calls == []


# -- keys ------------------------------------------------------------------------------------------------


def test_get_public_key_checks_the_pem_and_recomputes_the_efuse_digest(client: KmsClient) -> None:
    for name, algorithm in [
        ("keys/thermostat-sb0", Algorithm.ECDSA_P256_SHA256),
        ("keys/thermostat-sb1/versions/1", Algorithm.RSA_3072_PSS_SHA256),
        ("keys/artifacts", Algorithm.ECDSA_P384_SHA384),
    ]:
        info = client.get_public_key(name)
        assert info.algorithm is algorithm
        assert info.key_version.startswith(name.partition("/versions/")[0] + "/versions/")
        expected = fake_kms.public_pem(info.key_version)
        assert info.pem == expected
        assert serialization.load_pem_public_key(info.pem.encode())
        assert len(info.sbv2_key_digest) == 32


@pytest.mark.parametrize(
    ("tamper", "message"),
    [("pem-crc", "CRC32C mismatch"), ("sbv2-digest", "do not burn it"), ("algorithm", "the server says")],
)
def test_get_public_key_integrity_failures_raise(
    client: KmsClient, fake: FakeKms, tamper: Tamper, message: str
) -> None:
    fake.tamper = tamper
    with pytest.raises(IntegrityError, match=message):
        client.get_public_key("keys/thermostat-sb0")


def test_unknown_key_is_not_found(client: KmsClient) -> None:
    with pytest.raises(NotFoundError, match="no key 'keys/nope'"):
        client.get_public_key("keys/nope")


def test_list_keys_converts_every_field(client: KmsClient) -> None:
    keys = {key.name: key for key in client.list_keys("thermostat")}
    assert sorted(keys) == ["keys/artifacts", "keys/thermostat-sb0", "keys/thermostat-sb1"]
    sb0 = keys["keys/thermostat-sb0"]
    assert (sb0.purpose, sb0.algorithm, sb0.sbv2_slot) == (
        KeyPurpose.SECURE_BOOT_V2,
        Algorithm.ECDSA_P256_SHA256,
        0,
    )
    assert sb0.primary_version == "keys/thermostat-sb0/versions/2"
    assert [(v.name, v.state) for v in sb0.versions] == [
        ("keys/thermostat-sb0/versions/1", KeyVersionState.DISABLED),
        ("keys/thermostat-sb0/versions/2", KeyVersionState.ENABLED),
    ]
    assert all(v.create_time is not None for v in sb0.versions)
    assert keys["keys/artifacts"].purpose is KeyPurpose.DIGEST_SIGNING
    assert keys["keys/artifacts"].sbv2_slot is None
    assert len(client.list_keys()) == 4
