"""What the officer commands share (``kmsctl slots``, ``policy``, ``kek``, ``approvals``, ``floor``,
``devices reprovision``, ``keys rollover``), so that each of their modules holds only its own commands:

- ``CommandGroup`` and ``add_command``: a command group (``kmsctl slots COMMAND``) and its commands, each
  with the connection and output options, its default ``--identity`` (security-officer unless told) and
  the exit codes in its help;
- ``call``: one unary RPC over a ``KmsClient``'s connection (``KmsClient.call_unary``), by service and
  method name as the protos spell them, errors as ``KmsClientError``; not retried unless asked, since a
  repeated request for approval would make a second request;
- ``moment`` and ``iso_time``: a ``Timestamp`` field as a UTC datetime, or as ``--json`` prints it;
- ``request_approval`` and ``requested``: asking for an act under dual control
  (``ApprovalService.Request*``), and what a command that did prints (the new request, then the steps
  that follow it).

``kmsctl.cli`` imports the modules that import this one while it builds its parser, before gRPC may be
loaded (see ``cli.main``): what needs gRPC, the stubs or ``kmsctl.cli`` is imported inside the functions.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from google.protobuf.descriptor import FileDescriptor
    from google.protobuf.message import Message

    from kmsapi.v1 import approvals_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

SECURITY_OFFICER = "security-officer"

Command = Callable[[argparse.Namespace, "KmsClient"], "Outcome"]
Reply = TypeVar("Reply", bound="Message")


def add_command(
    subcommands: Any,
    common_parents: list[argparse.ArgumentParser],
    name: str,
    summary: str,
    command: Command,
    *,
    identity: str = SECURITY_OFFICER,
    epilog: str = "",
) -> argparse.ArgumentParser:
    """Add the command ``name`` running ``command`` to ``subcommands``; ``common_parents`` are the connection
    and output option parsers every command shares. Its help ends with ``epilog``, then its default
    ``--identity`` and the exit codes."""
    from kmsctl.cli import _EXIT_CODES_HELP

    sub: argparse.ArgumentParser = subcommands.add_parser(
        name,
        help=summary,
        description=summary,
        parents=common_parents,
        epilog=f"{epilog}default --identity: {identity}\n\n{_EXIT_CODES_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub.set_defaults(command=command, local_command=None, default_identity=identity)
    return sub


class CommandGroup:
    """The officer commands of ``kmsctl NAME COMMAND``, added to the top-level ``commands`` subparsers;
    ``common_parents`` are the connection and output option parsers every command shares. With
    ``product_help``, every command of the group takes a required ``--product`` (its help text)."""

    def __init__(
        self,
        commands: Any,
        common_parents: list[argparse.ArgumentParser],
        name: str,
        summary: str,
        description: str,
        *,
        product_help: str | None = None,
    ) -> None:
        group = commands.add_parser(name, help=summary, description=description)
        self._subcommands = group.add_subparsers(title="commands", metavar="COMMAND", required=True)
        self._common_parents = common_parents
        self._product_help = product_help

    def add(self, name: str, summary: str, command: Command) -> argparse.ArgumentParser:
        """Add the command ``name`` running ``command`` (see ``add_command``)."""
        sub = add_command(self._subcommands, self._common_parents, name, summary, command)
        if self._product_help is not None:
            sub.add_argument("--product", required=True, help=self._product_help)
        return sub


def call(
    client: KmsClient,
    file_descriptor: FileDescriptor,
    service: str,
    method: str,
    request: Message,
    reply: type[Reply],
    *,
    retry: bool = False,
) -> Reply:
    """Call ``service.method`` (declared in ``file_descriptor``, e.g. ``approvals_pb2.DESCRIPTOR``) over
    ``client``'s connection and return its ``reply``; gRPC errors become ``KmsClientError``. Called once
    unless ``retry`` (reads only: see ``KmsClient.call_unary``)."""
    from kmsctl import _wire  # loads gRPC: see the module docstring

    path = _wire.method_path(file_descriptor, service, method)
    return client.call_unary(path, request, reply, retry=retry)


def moment(message: Message, field: str) -> datetime | None:
    """The ``Timestamp`` ``field`` of ``message`` as an aware UTC datetime; None when it is not set."""
    if not message.HasField(field):
        return None
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value


def iso_time(message: Message, field: str) -> str | None:
    """The ``Timestamp`` ``field`` of ``message`` as ``--json`` prints it (ISO 8601, UTC); None when unset."""
    value = moment(message, field)
    return None if value is None else value.isoformat()


def request_approval(client: KmsClient, method: str, request: Message) -> approvals_pb2.ApprovalRequest:
    """Call ``ApprovalService.method`` (a ``Request*`` method: the act's own request message) once and return
    the approval request it made. Never retried: a repeat would make a second request."""
    from kmsapi.v1 import approvals_pb2

    return call(
        client, approvals_pb2.DESCRIPTOR, "ApprovalService", method, request, approvals_pb2.ApprovalRequest
    )


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
