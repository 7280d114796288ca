"""A bare gRPC unary echo server: the floor a unary RPC cannot go below on this machine.

It is built like the KMS server (``kms.server.app.KmsServer``) from the same configuration file: the same
mutual-TLS credentials (server certificate, client CA, ``require_client_auth=True``), the same channel
options, the same thread pool size and ``maximum_concurrent_rpcs``. What it leaves out is the work of the
service: no interceptor, no protobuf parsing, no handler logic. Messages are bytes as they arrive
(identity serializers).

- ``/bench.Echo/Echo`` (unary) answers with fixed bytes: a real serialized ``SignDigestResponse`` read
  from ``--response-file``, so that the response has the size of the service's. Without
  ``--response-file`` it echoes the request.
- ``/bench.Echo/Stream`` (bidirectional streaming) sends every message back as it arrives: an image
  uploaded and downloaded in chunks as ``SignImage`` does it, with nothing else, the transport's ceiling.

    python -m bench.echo --config STATE/kms.toml --ready-file FILE [--response-file FILE]

Runs until SIGTERM or SIGINT; writes the bound port to the ready file once serving.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc

from kms.server.app import _server_options
from kms.server.config import load_config

ECHO_METHOD = "/bench.Echo/Echo"
STREAM_METHOD = "/bench.Echo/Stream"
_SERVICE = "bench.Echo"


def build_server(config_path: Path, response: bytes | None) -> tuple[grpc.Server, int]:
    """The echo server, bound to a free loopback port, not started."""
    config = load_config(config_path)
    limits = config.limits
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="rpc"),
        options=_server_options(config),
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
    )

    def echo(request: bytes, _context: grpc.ServicerContext) -> bytes:
        return request if response is None else response

    def stream(requests: Iterator[bytes], _context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    handler = grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=config.tls_client_ca.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    if port == 0:
        raise OSError("cannot listen on a loopback port")
    return server, port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the KMS configuration (kms.toml)")
    parser.add_argument("--ready-file", type=Path, required=True, help="the bound port is written here")
    parser.add_argument("--response-file", type=Path, help="answer every call with these bytes")
    args = parser.parse_args(argv)
    response = args.response_file.read_bytes() if args.response_file else None
    server, port = build_server(args.config, response)
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    tmp = args.ready_file.with_suffix(".tmp")
    tmp.write_text(f"{port}\n", encoding="ascii")
    tmp.replace(args.ready_file)
    stopping.wait()
    server.stop(5).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
