"""What the officer commands that *request* an act under dual control share (``floor lower``,
``devices reprovision``): one unary call on a ``KmsClient``'s connection, not retried (a repeat would make a
second request), and the outcome that prints the new request with the steps that follow it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from kmsapi.v1 import approvals_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports the modules that import this one; what this module needs of it is imported inside the
# functions.

SECURITY_OFFICER = "security-officer"

Command = Callable[[argparse.Namespace, "KmsClient"], "Outcome"]


def call(
    client: KmsClient, file_descriptor: Any, service: str, method: str, request: Any, response: Any
) -> Any:
    """Call ``service.method`` once over ``client``'s connection; gRPC errors become ``KmsClientError``."""
    from kmsctl import _wire

    rpc = client._channel.unary_unary(
        _wire.method_path(file_descriptor, service, method),
        request_serializer=type(request).SerializeToString,
        response_deserializer=response.FromString,
    )
    try:
        return rpc(request, timeout=client._timeout)
    except grpc.RpcError as error:
        raise _wire.translate(error) from error


def requested(message: approvals_pb2.ApprovalRequest, what: str) -> Outcome:
    """The outcome of a Request* call: the request as JSON, and for people its id and the next steps."""
    from kmsctl._approvals_cli import request_json
    from kmsctl.cli import Outcome

    data = request_json(message)
    summary = "\n".join(
        [
            f"requested {what}: approval request {message.id} "
            f"({data['state']}, expires {data['expire_time']})",
            f"next: {message.required_approvals} other security officer(s) approve it:",
            f"  kmsctl approvals approve {message.id} --identity OFFICER",
            "then any officer executes it before it expires:",
            f"  kmsctl approvals execute {message.id}",
        ]
    )
    return Outcome(data, summary)


def add_command(
    subcommands: Any, common_parents: list[argparse.ArgumentParser], name: str, summary: str, command: Command
) -> argparse.ArgumentParser:
    """Add an officer command ``name`` to ``subcommands`` (default identity: security-officer)."""
    from kmsctl.cli import _EXIT_CODES_HELP

    sub: argparse.ArgumentParser = subcommands.add_parser(
        name,
        help=summary,
        description=summary,
        parents=common_parents,
        epilog=f"default --identity: {SECURITY_OFFICER}\n\n{_EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub.set_defaults(command=command, local_command=None, default_identity=SECURITY_OFFICER)
    return sub
