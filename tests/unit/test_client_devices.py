"""The kmsctl client library's factory and distribution calls against the fake KMS on loopback:
device registration (wrapped secrets, acknowledgements, window, resume), devices, and payload downloads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kmsapi.v1 import devices_pb2
from kmsctl import (
    DeadlineExceededError,
    DeviceRegistration,
    DeviceState,
    FailedPreconditionError,
    IntegrityError,
    InvalidArgumentError,
    KmsClient,
    NotFoundError,
    PayloadFormat,
    PermissionDeniedError,
    RegistrationStatus,
    RetryPolicy,
    RowOutcome,
    UnavailableError,
)
from kmsctl._registration import BatchKey
from tests.support import fake_kms
from tests.support.fake_kms import DOORBELL_RELEASE, THERMOSTAT_RELEASE, FakeKms, RunningServer

FAST_RETRIES = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.005)


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


def secret_of(device_id: str) -> bytes:
    return hashlib.sha256(b"secret of " + device_id.encode()).digest()


def devices(count: int, prefix: str = "dev", chip: str = "esp32s3") -> list[DeviceRegistration]:
    return [DeviceRegistration(f"{prefix}-{n}", chip, secret_of(f"{prefix}-{n}")) for n in range(count)]


def payload(device_id: str, release: str = THERMOSTAT_RELEASE, segment_size: int = 4096) -> bytes:
    return fake_kms.payload_bytes(device_id, release, devices_pb2.FKSP_V1, segment_size)


# -- registration key and wrapping -----------------------------------------------------------------------


def test_registration_key_is_the_products_rsa_key(client: KmsClient) -> None:
    info = client.registration_key("thermostat")
    assert info.key_version == "keys/thermostat-transport/versions/1"
    key = serialization.load_pem_public_key(info.pem.encode())
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 3072
    assert (
        key.public_numbers() == fake_kms.registration_private_key("thermostat").public_key().public_numbers()
    )


def test_a_registration_key_that_is_not_rsa_3072_is_refused(client: KmsClient, fake: FakeKms) -> None:
    fake.tamper = "registration-key"
    with pytest.raises(IntegrityError, match="not an RSA key"):
        client.registration_key("thermostat")
    with pytest.raises(IntegrityError, match="not an RSA key"):
        client.register_devices("thermostat", devices(3))
    assert "RegisterDevices" not in fake.calls, "no secret is sent to an unusable key"


def test_wrapped_registration_sends_only_40_byte_wrapped_secrets_that_the_hsm_unwraps(
    client: KmsClient, fake: FakeKms
) -> None:
    rows = devices(1203)
    summary = client.register_devices("thermostat", rows)

    assert (summary.created, summary.unchanged, summary.rejected) == (1203, 0, [])
    assert summary.transport_key_version == "keys/thermostat-transport/versions/1"
    [header] = fake.register_headers
    assert header.product == "thermostat"
    assert header.transport_key_version == "keys/thermostat-transport/versions/1"
    batch_key = fake_kms.registration_private_key("thermostat").decrypt(
        header.wrapped_batch_key, fake_kms.OAEP
    )
    assert len(batch_key) == 32
    assert fake.message_sizes == [500, 500, 203]
    secrets_sent = [row.secret for row in fake.wire_rows]
    assert all(len(secret) == 40 for secret in secrets_sent)
    plaintexts = {row.secret for row in rows}
    assert not any(plain in wrapped for plain in plaintexts for wrapped in secrets_sent[:50])
    assert {device_id: device.secret for device_id, device in fake.devices.items()} == {
        row.device_id: row.secret for row in rows
    }
    assert [row.row for row in fake.wire_rows] == list(range(1, 1204)), "rows numbered by position"


def test_each_stream_uses_a_fresh_batch_key(client: KmsClient, fake: FakeKms) -> None:
    client.register_devices("thermostat", devices(2, "a"))
    client.register_devices("thermostat", devices(2, "b"))
    first, second = fake.register_headers
    assert first.wrapped_batch_key != second.wrapped_batch_key


def test_the_batch_key_is_wiped_after_the_call_even_when_it_fails(
    client: KmsClient, fake: FakeKms, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys: list[BatchKey] = []
    original_init = BatchKey.__init__

    def init(self: BatchKey, *args: object) -> None:
        original_init(self, *args)  # type: ignore[arg-type]
        keys.append(self)

    monkeypatch.setattr(BatchKey, "__init__", init)
    client.register_devices("thermostat", devices(3))
    fake.abort_with = (grpc.StatusCode.PERMISSION_DENIED, "not a factory")
    fake.tamper = "none"
    with pytest.raises(PermissionDeniedError):
        client.register_devices("thermostat", devices(3))
    registration_keys = [key for key in keys if key.wrapped]
    assert len(registration_keys) >= 1
    assert all(key._key == bytearray(32) for key in registration_keys)


def test_plain_transport_sends_the_secrets_themselves(client: KmsClient, fake: FakeKms) -> None:
    rows = devices(5)
    summary = client.register_devices("thermostat", rows, transport="plain")
    assert summary.created == 5 and summary.transport_key_version == ""
    [header] = fake.register_headers
    assert header.transport_key_version == "" and header.wrapped_batch_key == b""
    assert [row.secret for row in fake.wire_rows] == [row.secret for row in rows]
    assert "GetRegistrationKey" not in fake.calls


def test_ecies_keys_and_explicit_row_numbers_are_sent(client: KmsClient, fake: FakeKms) -> None:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    rows = [
        DeviceRegistration("24:6f:28:00:00:01", "esp32c6", secret_of("1"), ecies_public_key=point[1:], row=2),
        DeviceRegistration("24:6f:28:00:00:02", "esp32c6", secret_of("2"), ecies_public_key=point, row=7),
    ]
    outcomes: list[RowOutcome] = []
    client.register_devices("thermostat", rows, on_outcome=outcomes.append)
    assert [(row.row, row.ecies_public_key) for row in fake.wire_rows] == [(2, point), (7, point)], (
        "X||Y goes out as SEC1 04||X||Y"
    )
    assert [(o.row, o.device_id, o.status) for o in outcomes] == [
        (2, "24:6f:28:00:00:01", RegistrationStatus.CREATED),
        (7, "24:6f:28:00:00:02", RegistrationStatus.CREATED),
    ]


# -- outcomes, progress, window --------------------------------------------------------------------------


def test_rows_the_server_refuses_are_reported_and_the_others_kept(client: KmsClient, fake: FakeKms) -> None:
    client.register_devices("thermostat", devices(2, "old"))
    rows = [
        DeviceRegistration("old-0", "esp32s3", secret_of("old-0")),  # same secret: unchanged
        DeviceRegistration("old-1", "esp32s3", bytes(32)),  # another secret: conflict
        DeviceRegistration("new-0", "esp99", secret_of("new-0")),  # unknown chip
        DeviceRegistration("new-1", "esp32s3", secret_of("new-1")),
    ]
    outcomes: list[RowOutcome] = []
    summary = client.register_devices("thermostat", rows, batch_size=3, on_outcome=outcomes.append)

    assert (summary.created, summary.unchanged, summary.total) == (1, 1, 4)
    assert [(o.row, o.device_id, o.code) for o in summary.rejected] == [
        (2, "old-1", "ALREADY_EXISTS"),
        (3, "new-0", "INVALID_ARGUMENT"),
    ]
    assert "another secret" in summary.rejected[0].message
    assert "unknown chip 'esp99'" in summary.rejected[1].message
    assert [o.status for o in outcomes] == [
        RegistrationStatus.UNCHANGED,
        RegistrationStatus.REJECTED,
        RegistrationStatus.REJECTED,
        RegistrationStatus.CREATED,
    ]
    assert all(
        o.code == "" and o.message == "" for o in outcomes if o.status is not RegistrationStatus.REJECTED
    )
    assert fake.devices["old-1"].secret == secret_of("old-1"), "a conflict changes nothing"


def test_progress_counts_acknowledged_rows_after_their_outcomes(client: KmsClient) -> None:
    events: list[object] = []
    client.register_devices(
        "thermostat",
        devices(25),
        batch_size=10,
        progress=lambda done, total: events.append((done, total)),
        on_outcome=lambda outcome: events.append(outcome.row),
    )
    assert events == [
        (0, 25),
        *range(1, 11),
        (10, 25),
        *range(11, 21),
        (20, 25),
        *range(21, 26),
        (25, 25),
    ]


def test_a_generator_is_read_only_as_fast_as_the_server_acknowledges(
    client: KmsClient, fake: FakeKms
) -> None:
    fake.register_ack_delay = 0.005
    pulled = 0
    ahead: list[int] = []

    def rows() -> Iterator[DeviceRegistration]:
        nonlocal pulled
        for row in devices(300):
            pulled += 1
            yield row

    def progress(done: int, total: int | None) -> None:
        assert total is None, "a generator has no length"
        ahead.append(pulled - done)

    summary = client.register_devices("thermostat", rows(), batch_size=10, window=4, progress=progress)
    assert summary.created == 300
    assert max(ahead) <= 4 * 10, "never more than the window read ahead of the acknowledgements"
    assert 2 <= fake.max_unacked <= 4, "messages are pipelined, within the window"


def test_an_empty_input_registers_nothing(client: KmsClient, fake: FakeKms) -> None:
    summary = client.register_devices("thermostat", [])
    assert (summary.created, summary.unchanged, summary.rejected) == (0, 0, [])
    assert fake.calls == ["GetRegistrationKey", "RegisterDevices"]


# -- resume and failures ---------------------------------------------------------------------------------


def test_a_stream_cut_mid_way_resumes_at_the_first_unacknowledged_row(
    client: KmsClient, fake: FakeKms
) -> None:
    fake.register_break_after = [2]  # commits message 2, then UNAVAILABLE before acknowledging it
    outcomes: list[RowOutcome] = []
    progress: list[int] = []
    rows = devices(450)

    summary = client.register_devices(
        "thermostat",
        rows,
        batch_size=100,
        on_outcome=outcomes.append,
        progress=lambda done, _: progress.append(done),
    )

    assert fake.calls == ["GetRegistrationKey", "RegisterDevices", "RegisterDevices"]
    first, second = fake.register_headers
    assert second.wrapped_batch_key == first.wrapped_batch_key, "the resumed stream keeps its batch key"
    assert [row.row for row in fake.wire_rows] == [*range(1, 201), *range(101, 451)]
    assert [o.row for o in outcomes] == list(range(1, 451)), "each row reported once, in order"
    assert (summary.created, summary.unchanged) == (350, 100), (
        "the committed, unacknowledged rows are unchanged"
    )
    assert len(fake.devices) == 450
    assert progress == [0, 100, 200, 300, 400, 450]


def test_unavailable_before_the_stream_starts_is_retried(client: KmsClient, fake: FakeKms) -> None:
    fake.fail_unavailable = 2
    assert client.register_devices("thermostat", devices(3), transport="plain").created == 3
    assert fake.calls == ["RegisterDevices"] * 3


def test_failures_without_progress_give_up_after_the_policy_attempts(
    client: KmsClient, fake: FakeKms
) -> None:
    fake.register_break_after = [1] * 10  # the first message is committed, never acknowledged
    with pytest.raises(UnavailableError, match=r"registry connection lost \(fake\) \(after 3 attempts\)"):
        client.register_devices("thermostat", devices(30), batch_size=10, transport="plain")
    assert fake.calls == ["RegisterDevices"] * 3


def test_failures_that_make_progress_do_not_use_up_the_retries(client: KmsClient, fake: FakeKms) -> None:
    fake.register_break_after = [2] * 8  # each stream acknowledges one message, then breaks
    summary = client.register_devices("thermostat", devices(60), batch_size=10, transport="plain")
    assert summary.created + summary.unchanged == 60
    assert fake.calls.count("RegisterDevices") == 6
    assert len(fake.devices) == 60


def test_acknowledgements_of_other_rows_are_an_integrity_error(client: KmsClient, fake: FakeKms) -> None:
    fake.tamper = "ack-rows"
    with pytest.raises(IntegrityError, match=r"acknowledged rows 2-4 .*rows 1-3"):
        client.register_devices("thermostat", devices(3), transport="plain")


@pytest.mark.parametrize("transport", ["wrapped", "plain"])
def test_an_unknown_product_is_not_found(client: KmsClient, transport: str) -> None:
    with pytest.raises(NotFoundError, match="unknown product 'toaster'"):
        client.register_devices("toaster", devices(1), transport=transport)  # type: ignore[arg-type]


def test_an_exception_from_the_rows_is_reraised_not_cancelled(client: KmsClient) -> None:
    def rows() -> Iterator[DeviceRegistration]:
        yield from devices(15)
        raise RuntimeError("the input file went away")

    with pytest.raises(RuntimeError, match="the input file went away"):
        client.register_devices("thermostat", rows(), batch_size=10)


def test_an_exception_from_a_callback_ends_the_call(client: KmsClient, fake: FakeKms) -> None:
    def on_outcome(outcome: RowOutcome) -> None:
        if outcome.row == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.register_devices("thermostat", devices(100), batch_size=10, on_outcome=on_outcome)
    assert len(fake.devices) < 100


def test_a_server_that_stops_acknowledging_hits_the_idle_deadline(served: RunningServer) -> None:
    served.fake.register_ack_delay = 2.0
    with (
        KmsClient.insecure_for_tests(served.target, timeout=0.3, retries=FAST_RETRIES) as kms,
        pytest.raises(DeadlineExceededError, match=r"acknowledged nothing for 0\.3 seconds"),
    ):
        kms.register_devices("thermostat", devices(3), transport="plain")
    assert served.fake.calls == ["RegisterDevices"], "not retried"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be 1-1000"),
        ({"batch_size": 1001}, "batch_size must be 1-1000"),
        ({"window": 0}, "window must be at least 1"),
        ({"transport": "carrier-pigeon"}, "unknown transport"),
    ],
)
def test_bad_registration_arguments_are_refused_before_calling(
    client: KmsClient, fake: FakeKms, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        client.register_devices("thermostat", devices(1), **kwargs)  # type: ignore[arg-type]
    assert fake.calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_id": "has space"}, "malformed device id"),
        ({"device_id": "x" * 65}, "malformed device id"),
        ({"device_id": ""}, "malformed device id"),
        ({"chip": "ESP32-S3"}, "malformed chip"),
        ({"secret": bytes(31)}, "32 bytes, not 31"),
        ({"ecies_public_key": bytes(63)}, "not 63 bytes"),
        ({"ecies_public_key": b"\x05" + bytes(64)}, "not 65 bytes"),
        ({"ecies_public_key": bytes(64)}, "not a point on P-256"),
        ({"row": -1}, "not negative"),
    ],
)
def test_a_device_registration_checks_its_fields(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"device_id": "24:6f:28:aa:bb:cc", "chip": "esp32s3", "secret": bytes(32)}
    with pytest.raises(ValueError, match=message):
        DeviceRegistration(**{**fields, **kwargs})  # type: ignore[arg-type]
    assert "secret" not in repr(DeviceRegistration("d", "esp32", bytes(32)))


# -- devices ---------------------------------------------------------------------------------------------


def test_device_and_revoke(client: KmsClient, fake: FakeKms) -> None:
    client.register_devices("thermostat", devices(1))
    info = client.device("dev-0")
    assert (info.device_id, info.product, info.chip, info.state) == (
        "dev-0",
        "thermostat",
        "esp32s3",
        DeviceState.ACTIVE,
    )
    assert info.kek_version == "keys/thermostat-kek/versions/1"
    assert info.has_ecies_public_key is False
    assert info.register_time is not None and info.register_time.year == 2025
    assert client.revoke_device("dev-0").state is DeviceState.REVOKED
    assert client.revoke_device("dev-0").state is DeviceState.REVOKED, "idempotent"
    with pytest.raises(NotFoundError, match="no device 'nope'"):
        client.device("nope")


# -- payloads --------------------------------------------------------------------------------------------


def test_get_payload_into_memory(client: KmsClient, fake: FakeKms) -> None:
    fake.add_device("d1")
    calls: list[tuple[int, int]] = []
    result = client.get_payload(
        "d1", THERMOSTAT_RELEASE, progress=lambda at, total: calls.append((at, total))
    )

    expected = payload("d1")
    assert result.data == expected and result.path is None
    info = result.info
    assert (info.format, info.total_size, info.device_id, info.release) == (
        PayloadFormat.FKSP_V1,
        len(expected),
        "d1",
        THERMOSTAT_RELEASE,
    )
    assert (info.secure_version, info.segment_size) == (4, 4096)
    assert info.manifest_key_version == "keys/thermostat-manifest/versions/1"
    assert calls[0] == (0, len(expected)) and calls[-1] == (len(expected), len(expected))
    assert len(calls) == 1 + -(-len(expected) // fake_kms.PAYLOAD_CHUNK)
    [request] = fake.payload_requests
    assert (request.format, request.offset, request.segment_size) == (devices_pb2.FKSP_V1, 0, 0)
    assert not request.HasField("device_secure_version")


def test_get_payload_options_reach_the_server(client: KmsClient, fake: FakeKms, tmp_path: Path) -> None:
    fake.add_device("d1", ecies=True)
    result = client.get_payload(
        "d1", THERMOSTAT_RELEASE.removeprefix("releases/"), segment_size=1024, device_secure_version=4
    )
    assert result.data == payload("d1", segment_size=1024)
    request = fake.payload_requests[-1]
    assert request.release == THERMOSTAT_RELEASE, "a bare digest is completed to releases/HEX"
    assert request.segment_size == 1024 and request.device_secure_version == 4

    esp = client.get_payload(
        "d1", THERMOSTAT_RELEASE, format="esp-encrypted-img", output=tmp_path / "ota.bin"
    )
    assert esp.info.format is PayloadFormat.ESP_ENCRYPTED_IMG_ECIES and esp.info.segment_size == 0
    assert (tmp_path / "ota.bin").read_bytes() == fake_kms.payload_bytes(
        "d1", THERMOSTAT_RELEASE, devices_pb2.ESP_ENCRYPTED_IMG_ECIES, 0
    )
    assert fake.payload_requests[-1].format == devices_pb2.ESP_ENCRYPTED_IMG_ECIES


def test_get_payload_from_an_offset(client: KmsClient, fake: FakeKms) -> None:
    fake.add_device("d1")
    result = client.get_payload("d1", THERMOSTAT_RELEASE, offset=100_000)
    assert result.data == payload("d1")[100_000:]
    assert result.start_offset == 100_000
    assert fake.payload_requests[-1].offset == 100_000


def test_get_payload_to_a_file_leaves_no_part_file(client: KmsClient, fake: FakeKms, tmp_path: Path) -> None:
    fake.add_device("d1")
    output = tmp_path / "d1.fksp"
    result = client.get_payload("d1", THERMOSTAT_RELEASE, output=output)
    assert result.path == output and result.data is None
    assert output.read_bytes() == payload("d1")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d1.fksp"]


@pytest.mark.parametrize("cut", ["payload_break_after", "payload_end_after"])
def test_a_broken_download_resumes_at_the_byte_it_reached(
    client: KmsClient, fake: FakeKms, tmp_path: Path, cut: str
) -> None:
    fake.add_device("d1")
    setattr(fake, cut, [2, 1])
    positions: list[int] = []
    output = tmp_path / "d1.fksp"

    result = client.get_payload(
        "d1", THERMOSTAT_RELEASE, output=output, progress=lambda at, _: positions.append(at)
    )

    chunk = fake_kms.PAYLOAD_CHUNK
    assert output.read_bytes() == payload("d1")
    assert [request.offset for request in fake.payload_requests] == [0, 2 * chunk, 3 * chunk]
    assert result.resumes == 2
    assert positions == sorted(positions), "progress never goes back"


def test_resume_from_a_part_file_checks_its_tail_first(
    client: KmsClient, fake: FakeKms, tmp_path: Path
) -> None:
    fake.add_device("d1")
    output = tmp_path / "d1.fksp"
    Path(f"{output}.part").write_bytes(payload("d1")[:150_000])

    result = client.get_payload("d1", THERMOSTAT_RELEASE, output=output, resume=True)

    assert output.read_bytes() == payload("d1")
    assert [request.offset for request in fake.payload_requests] == [150_000 - 4096]
    assert result.start_offset == 150_000
    assert not Path(f"{output}.part").exists()


@pytest.mark.parametrize(
    "stale",
    [
        payload("other")[:150_000],  # another device's payload
        payload("d1", segment_size=1024)[:150_000],  # same device, other segment size
        payload("d1") + b"junk",  # longer than the payload
        payload("d1")[:1000],  # shorter than the overlap
    ],
    ids=["other-device", "other-segmentation", "too-long", "short"],
)
def test_a_stale_part_file_is_detected_and_the_download_starts_over(
    client: KmsClient, fake: FakeKms, tmp_path: Path, stale: bytes
) -> None:
    fake.add_device("d1")
    output = tmp_path / "d1.fksp"
    Path(f"{output}.part").write_bytes(stale)

    result = client.get_payload("d1", THERMOSTAT_RELEASE, output=output, resume=True)

    assert output.read_bytes() == payload("d1")
    offsets = [request.offset for request in fake.payload_requests]
    if stale[:1000] == payload("d1")[:1000] and len(stale) == 1000:
        assert offsets == [0] and result.start_offset == 1000, "a short part is compared whole"
    else:
        assert offsets[-1] == 0 and result.start_offset == 0


def test_without_resume_an_existing_part_file_is_replaced(
    client: KmsClient, fake: FakeKms, tmp_path: Path
) -> None:
    fake.add_device("d1")
    output = tmp_path / "d1.fksp"
    Path(f"{output}.part").write_bytes(b"x" * 5000)
    client.get_payload("d1", THERMOSTAT_RELEASE, output=output)
    assert output.read_bytes() == payload("d1")
    assert [request.offset for request in fake.payload_requests] == [0]


def test_an_interrupted_download_keeps_its_part_file_for_the_next_call(
    served: RunningServer, tmp_path: Path
) -> None:
    fake = served.fake
    fake.add_device("d1")
    fake.payload_break_after = [2]
    output = tmp_path / "d1.fksp"
    with KmsClient.insecure_for_tests(served.target, retries=RetryPolicy(max_attempts=1)) as kms:
        with pytest.raises(UnavailableError, match="restarting"):
            kms.get_payload("d1", THERMOSTAT_RELEASE, output=output)
        assert Path(f"{output}.part").stat().st_size == 2 * fake_kms.PAYLOAD_CHUNK
        assert not output.exists()
        result = kms.get_payload("d1", THERMOSTAT_RELEASE, output=output, resume=True)
    assert output.read_bytes() == payload("d1")
    assert result.start_offset == 2 * fake_kms.PAYLOAD_CHUNK


def test_persistent_unavailability_gives_up_and_leaves_no_empty_part(
    client: KmsClient, fake: FakeKms, tmp_path: Path
) -> None:
    fake.add_device("d1")
    fake.fail_unavailable = 10
    with pytest.raises(UnavailableError, match=r"after 3 attempts"):
        client.get_payload("d1", THERMOSTAT_RELEASE, output=tmp_path / "d1.fksp")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("setup", "device", "release", "kwargs", "error", "message"),
    [
        ("", "d1", "releases/" + "00" * 32, {}, NotFoundError, "no release"),
        ("", "ghost", THERMOSTAT_RELEASE, {}, NotFoundError, "no device 'ghost'"),
        ("revoke", "d1", THERMOSTAT_RELEASE, {}, FailedPreconditionError, "revoked"),
        ("", "d1", DOORBELL_RELEASE, {}, FailedPreconditionError, "another product"),
        ("", "d1", THERMOSTAT_RELEASE, {"device_secure_version": 5}, FailedPreconditionError, "rollback"),
        ("", "d1", THERMOSTAT_RELEASE, {"format": "esp-encrypted-img"}, FailedPreconditionError, "ECIES"),
        ("payload-device", "d1", THERMOSTAT_RELEASE, {}, IntegrityError, "sealed for device 'someone-else'"),
        ("payload-extra", "d1", THERMOSTAT_RELEASE, {}, IntegrityError, "more than the"),
    ],
)
def test_payload_failures_raise_and_leave_no_file(
    client: KmsClient,
    fake: FakeKms,
    tmp_path: Path,
    setup: str,
    device: str,
    release: str,
    kwargs: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    fake.add_device("d1")
    if setup == "revoke":
        fake.devices["d1"].state = "revoked"
    elif setup:
        fake.tamper = setup  # type: ignore[assignment]
    with pytest.raises(error, match=message):
        client.get_payload(device, release, output=tmp_path / "out.bin", **kwargs)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "zip"}, "unknown payload format"),
        ({"format": "esp-encrypted-img", "segment_size": 4096}, "fksp format only"),
        ({"segment_size": 255}, "256-1048576"),
        ({"segment_size": (1 << 20) + 1}, "256-1048576"),
        ({"device_secure_version": -1}, "32-bit"),
        ({"offset": -1}, "not be negative"),
        ({"offset": 10, "output": "x.bin"}, "use resume"),
    ],
)
def test_bad_payload_arguments_are_refused_before_calling(
    client: KmsClient, fake: FakeKms, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        client.get_payload("d1", THERMOSTAT_RELEASE, **kwargs)  # type: ignore[arg-type]
    assert fake.calls == []
    assert not os.path.exists("x.bin.part")
