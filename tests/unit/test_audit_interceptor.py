"""AuditInterceptor on an in-process gRPC server with fake handlers of all four kinds and a real audit log.

Each call's record must be committed before its response arrives: the tests read the log right after each
call returns, without waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest

from kms.domain.audit import AuditRecord
from kms.domain.errors import InvalidArgument
from kms.server.audit_interceptor import REQUEST_ID_KEY, AuditInterceptor, audit_context, note, safe_text
from kms.server.auth import AuthorizationInterceptor
from kms.server.errors import translate_errors
from kms.server.pki import create_dev_pki
from kms.store.audit import SqliteAuditLog, read_records
from kms.store.database import Database

SERVICE = "test.Fake"
SIGN_DIGEST = "/kmsapi.v1.SigningService/SignDigest"  # build-server only, per METHOD_ROLES


class Fake:
    """Handlers driven by the request bytes: b"ok", b"fail" (INVALID_ARGUMENT), b"crash" (UNKNOWN)."""

    def __init__(self) -> None:
        self.streaming_started = threading.Event()

    @staticmethod
    def _act(what: bytes) -> None:
        note(product="fake", resource=what.decode())
        if what == b"fail":
            raise InvalidArgument("refused")
        if what == b"crash":
            raise RuntimeError("a bug")

    @translate_errors
    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._act(request)
        return b"done"

    @translate_errors
    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._act(list(requests)[-1])
        return b"done"

    @translate_errors
    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"first"
        if request == b"block":
            self.streaming_started.set()
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            yield b"never read"
            return
        # Noted after a message went out: the note must still reach the record (same context).
        self._act(request)
        note(key_version="keys/k/versions/1")
        yield b"last"

    @translate_errors
    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            self._act(request)
            yield request


def _handlers(fake: Fake) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(fake.unary),
            "ClientStream": grpc.stream_unary_rpc_method_handler(fake.client_stream),
            "ServerStream": grpc.unary_stream_rpc_method_handler(fake.server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(fake.bidi),
        },
    )


class Harness:
    def __init__(self, tmp_path: Path, interceptors: list[grpc.ServerInterceptor] | None = None) -> None:
        self.db = Database.open(tmp_path / "audit.db")
        self.log = SqliteAuditLog(self.db)
        self.fake = Fake()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            interceptors=interceptors or [AuditInterceptor(self.log)],
        )
        self.server.add_generic_rpc_handlers((_handlers(self.fake),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")

    def records(self) -> list[AuditRecord]:
        return read_records(self.db)

    def last(self) -> AuditRecord:
        return self.records()[-1]

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()
        self.log.close()
        self.db.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.close()


if TYPE_CHECKING:  # the generic forms exist in the type stubs only
    UnaryUnary = grpc.UnaryUnaryMultiCallable[bytes, bytes]
    UnaryStream = grpc.UnaryStreamMultiCallable[bytes, bytes]
    StreamUnary = grpc.StreamUnaryMultiCallable[bytes, bytes]
    StreamStream = grpc.StreamStreamMultiCallable[bytes, bytes]


def _uu(channel: grpc.Channel, method: str) -> UnaryUnary:
    return cast("UnaryUnary", channel.unary_unary(method))


def _us(channel: grpc.Channel, method: str) -> UnaryStream:
    return cast("UnaryStream", channel.unary_stream(method))


def _su(channel: grpc.Channel, method: str) -> StreamUnary:
    return cast("StreamUnary", channel.stream_unary(method))


def _ss(channel: grpc.Channel, method: str) -> StreamStream:
    return cast("StreamStream", channel.stream_stream(method))


def _unary(h: Harness, request: bytes, **kwargs: Any) -> Any:
    return _uu(h.channel, f"/{SERVICE}/Unary")(request, timeout=10, **kwargs)


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert isinstance(error, grpc.Call)
    return error.code()


# -- all four kinds, every outcome ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "outcome"), [(b"ok", "OK"), (b"fail", "INVALID_ARGUMENT"), (b"crash", "INTERNAL")]
)
def test_every_kind_is_recorded_with_its_outcome_before_the_answer(
    harness: Harness, request_bytes: bytes, outcome: str
) -> None:
    channel = harness.channel
    calls: dict[str, Callable[[], object]] = {
        "Unary": lambda: _uu(channel, f"/{SERVICE}/Unary")(request_bytes, timeout=10),
        "ClientStream": lambda: _su(channel, f"/{SERVICE}/ClientStream")(
            iter([b"x", request_bytes]), timeout=10
        ),
        "ServerStream": lambda: list(_us(channel, f"/{SERVICE}/ServerStream")(request_bytes, timeout=10)),
        "Bidi": lambda: list(_ss(channel, f"/{SERVICE}/Bidi")(iter([request_bytes]), timeout=10)),
    }
    for method, call in calls.items():
        if outcome == "OK":
            call()
        else:
            assert _code(call).name == outcome
        record = harness.last()  # no waiting: committed before the status was sent
        event = record.event
        assert event.operation == f"/{SERVICE}/{method}"
        assert event.outcome == outcome
        assert (event.caller, event.role) == ("", "")  # no client certificate
        assert event.product == "fake"
        assert event.resource == request_bytes.decode()
        if method == "ServerStream" and outcome == "OK":
            assert event.key_version == "keys/k/versions/1"
    assert [r.seq for r in harness.records()] == [1, 2, 3, 4]
    assert all(r.intact for r in harness.records())


def test_request_id_is_taken_from_metadata_or_generated_and_returned(harness: Harness) -> None:
    _response, call = _uu(harness.channel, f"/{SERVICE}/Unary").with_call(
        b"ok", timeout=10, metadata=((REQUEST_ID_KEY, "build-42/step-7"),)
    )
    assert harness.last().event.request_id == "build-42/step-7"
    assert (REQUEST_ID_KEY, "build-42/step-7") in call.trailing_metadata()

    _response, call = _uu(harness.channel, f"/{SERVICE}/Unary").with_call(
        b"ok", timeout=10, metadata=((REQUEST_ID_KEY, "has spaces"),)
    )
    generated = harness.last().event.request_id
    assert generated != "has spaces" and len(generated) == 32
    assert (REQUEST_ID_KEY, generated) in call.trailing_metadata()


def test_failed_call_carries_the_request_id_too(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _unary(harness, b"fail", metadata=((REQUEST_ID_KEY, "r-1"),))
    assert isinstance(raised.value, grpc.Call)
    assert (REQUEST_ID_KEY, "r-1") in raised.value.trailing_metadata()


def test_notes_do_not_leak_between_calls(harness: Harness) -> None:
    _unary(harness, b"ok")
    with pytest.raises(grpc.RpcError):
        _uu(harness.channel, f"/{SERVICE}/Missing")(b"", timeout=10)
    event = harness.last().event
    assert (event.operation, event.outcome, event.product, event.resource) == (
        f"/{SERVICE}/Missing",
        "UNIMPLEMENTED",
        "",
        "",
    )
    assert audit_context() is None  # not in a call
    note(product="ignored")  # outside a call: a no-op


def test_cancelled_stream_is_recorded_as_cancelled(harness: Harness) -> None:
    call = _us(harness.channel, f"/{SERVICE}/ServerStream")(b"block", timeout=10)
    assert next(call) == b"first"
    assert harness.fake.streaming_started.wait(5)
    call.cancel()
    deadline = time.monotonic() + 10
    while not harness.records() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert harness.last().event.outcome == "CANCELLED"
    assert harness.last().event.operation == f"/{SERVICE}/ServerStream"


def test_append_failure_fails_the_call_with_unavailable(harness: Harness) -> None:
    harness.log.close()  # append now raises StorageFailure
    channel = harness.channel
    assert _code(lambda: _unary(harness, b"ok")) is grpc.StatusCode.UNAVAILABLE
    assert _code(lambda: _unary(harness, b"fail")) is grpc.StatusCode.UNAVAILABLE
    server_stream = _us(channel, f"/{SERVICE}/ServerStream")
    received: list[bytes] = []

    def read_stream() -> None:
        received.extend(server_stream(b"ok", timeout=10))

    assert _code(read_stream) is grpc.StatusCode.UNAVAILABLE  # no OK status after an unrecorded stream
    assert (
        _code(lambda: list(_ss(channel, f"/{SERVICE}/Bidi")(iter([b"ok"]), timeout=10)))
        is grpc.StatusCode.UNAVAILABLE
    )
    assert harness.records() == []


def test_safe_text_escapes_what_a_record_refuses() -> None:
    assert safe_text("keys/a\nb\u202e") == "keys/a\\u000ab\\u202e"
    assert len(safe_text("é" * 2000).encode()) <= 1024


# -- order with the authorization interceptor -----------------------------------------------------------


def test_denied_calls_are_recorded_with_caller_and_role(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    create_dev_pki(pki)
    db = Database.open(tmp_path / "audit.db")
    log = SqliteAuditLog(db)
    fake = Fake()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[AuditInterceptor(log), AuthorizationInterceptor()],
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "kmsapi.v1.SigningService", {"SignDigest": grpc.unary_unary_rpc_method_handler(fake.unary)}
            ),
        )
    )
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        outcomes = {}
        for role in ("build-server", "auditor"):
            channel_credentials = grpc.ssl_channel_credentials(
                root_certificates=(pki / "ca.pem").read_bytes(),
                private_key=(pki / "clients" / f"{role}.key").read_bytes(),
                certificate_chain=(pki / "clients" / f"{role}.pem").read_bytes(),
            )
            with grpc.secure_channel(f"localhost:{port}", channel_credentials) as channel:
                try:
                    _uu(channel, SIGN_DIGEST)(b"ok", timeout=10)
                    outcomes[role] = "OK"
                except grpc.RpcError as error:
                    assert isinstance(error, grpc.Call)
                    outcomes[role] = error.code().name
        assert outcomes == {"build-server": "OK", "auditor": "PERMISSION_DENIED"}
        events = [r.event for r in read_records(db)]
        assert [(e.role, e.outcome, e.operation) for e in events] == [
            ("build-server", "OK", SIGN_DIGEST),
            ("auditor", "PERMISSION_DENIED", SIGN_DIGEST),
        ]
        assert events[1].caller == "spiffe://kms.dev/auditor/dev"
        assert events[1].resource == ""  # refused before the servicer ran
    finally:
        server.stop(None).wait()
        log.close()
        db.close()
