"""``kmsctl approvals``: dual control of acts that destroy or weaken (security officers).

    kmsctl approvals request-destroy VERSION [--delay SECONDS]
    kmsctl approvals list [--state pending|approved|rejected|expired|executed]
    kmsctl approvals approve ID
    kmsctl approvals reject ID --reason TEXT
    kmsctl approvals execute ID

An officer requests an act that destroys or weakens: the destruction of a key version (``request-destroy``
here, ``ApprovalService.RequestKeyVersionDestruction``), a Secure Boot V2 slot revocation (``kmsctl slots
revoke``), an anti-rollback floor lowering (``kmsctl floor lower``), a device re-provisioning (``kmsctl
devices reprovision``) or a policy change (``kmsctl policy propose``). The server's required number of
*other* officers approve it, each with their own certificate (``--identity`` and the connection options
choose it); then any officer executes it. A request expires after the server's ``[dual_control]
ttl_seconds``. VERSION is ``keys/ID/versions/N`` or ``ID/versions/N``. ``--json`` prints the request (and,
for ``execute``, the act's result) as JSON.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from kmsapi.v1 import approvals_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

SECURITY_OFFICER = "security-officer"
STATES = ("pending", "approved", "rejected", "expired", "executed")

Command = Callable[[argparse.Namespace, "KmsClient"], "Outcome"]


def _time(message: Any, field: str) -> str | None:
    if not message.HasField(field):
        return None
    moment: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return moment.isoformat()


def request_json(message: approvals_pb2.ApprovalRequest) -> dict[str, Any]:
    """An approval request as ``--json`` prints it."""
    from kmsapi.v1 import approvals_pb2

    def votes(items: Any) -> list[dict[str, Any]]:
        return [
            {"officer": v.officer, "time": _time(v, "time"), **({"reason": v.reason} if v.reason else {})}
            for v in items
        ]

    action = approvals_pb2.ApprovalAction.Name(message.action).removeprefix("APPROVAL_ACTION_")
    state = approvals_pb2.ApprovalState.Name(message.state).removeprefix("APPROVAL_STATE_")
    return {
        "id": message.id,
        "action": action.lower().replace("_", "-"),
        "target": message.target,
        "parameters": dict(message.parameters),
        "requester": message.requester,
        "create_time": _time(message, "create_time"),
        "expire_time": _time(message, "expire_time"),
        "required_approvals": message.required_approvals,
        "approvals": votes(message.approvals),
        "rejections": votes(message.rejections),
        "state": state.lower(),
        "execute_time": _time(message, "execute_time"),
        "executed_by": message.executed_by or None,
    }


class ApprovalClient:
    """The ApprovalService calls, over a ``KmsClient``'s connection (``ApprovalClient.of(client)``).
    None is retried: votes and executions are not meant to be repeated blindly (list first)."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        from kmsapi.v1 import approvals_pb2
        from kmsctl import _wire

        self._timeout = timeout
        self._channel = channel
        self._descriptor = approvals_pb2.DESCRIPTOR
        self._path = _wire.method_path

    @classmethod
    def of(cls, client: KmsClient) -> ApprovalClient:
        return cls(client._channel, client._timeout)

    def _call(self, method: str, request: Any, response_type: Any) -> Any:
        from kmsctl import _wire

        rpc = self._channel.unary_unary(
            self._path(self._descriptor, "ApprovalService", method),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return rpc(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise _wire.translate(error) from error

    def request_destroy(
        self, version: str, delay_seconds: int | None = None
    ) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        request = approvals_pb2.RequestKeyVersionDestructionRequest(name=version)
        if delay_seconds is not None:
            request.delay_seconds = delay_seconds
        result: approvals_pb2.ApprovalRequest = self._call(
            "RequestKeyVersionDestruction", request, approvals_pb2.ApprovalRequest
        )
        return result

    def list(self, state: str | None = None) -> list[approvals_pb2.ApprovalRequest]:
        from kmsapi.v1 import approvals_pb2

        number = approvals_pb2.ApprovalState.Value(f"APPROVAL_STATE_{state.upper()}") if state else 0
        response: approvals_pb2.ListApprovalRequestsResponse = self._call(
            "ListApprovalRequests",
            approvals_pb2.ListApprovalRequestsRequest(state=number),  # type: ignore[arg-type]
            approvals_pb2.ListApprovalRequestsResponse,
        )
        return list(response.requests)

    def approve(self, request_id: str) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        result: approvals_pb2.ApprovalRequest = self._call(
            "ApproveRequest",
            approvals_pb2.ApproveRequestRequest(id=request_id),
            approvals_pb2.ApprovalRequest,
        )
        return result

    def reject(self, request_id: str, reason: str) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        result: approvals_pb2.ApprovalRequest = self._call(
            "RejectRequest",
            approvals_pb2.RejectRequestRequest(id=request_id, reason=reason),
            approvals_pb2.ApprovalRequest,
        )
        return result

    def execute(self, request_id: str) -> approvals_pb2.ExecuteRequestResponse:
        from kmsapi.v1 import approvals_pb2

        result: approvals_pb2.ExecuteRequestResponse = self._call(
            "ExecuteRequest",
            approvals_pb2.ExecuteRequestRequest(id=request_id),
            approvals_pb2.ExecuteRequestResponse,
        )
        return result


def add_approval_commands(commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``approvals request-destroy|list|approve|reject|execute`` to the top-level ``commands``
    subparsers; ``common_parents`` are the connection and output option parsers every command shares."""
    from kmsctl.cli import _EXIT_CODES_HELP

    approvals = commands.add_parser(
        "approvals",
        help="Dual control: request, approve, reject and execute destructive acts (officers).",
        description="Dual control: acts that destroy need the approval of other security officers.",
    )
    sub_commands = approvals.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def add(name: str, summary: str, command: Command) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = sub_commands.add_parser(
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

    destroy = add("request-destroy", "Request the destruction of a key version.", _request_destroy)
    destroy.add_argument("name", metavar="VERSION", help="keys/ID/versions/N or ID/versions/N")
    destroy.add_argument(
        "--delay", type=int, metavar="SECONDS", help="destruction delay once executed (default 24 h)"
    )
    listing = add("list", "List approval requests, oldest first.", _list)
    listing.add_argument("--state", choices=STATES, help="only requests in this state")
    approve = add("approve", "Approve another officer's request.", _approve)
    approve.add_argument("id", metavar="ID")
    reject = add("reject", "Reject a request for good.", _reject)
    reject.add_argument("id", metavar="ID")
    reject.add_argument("--reason", required=True, help="why (recorded with the vote)")
    execute = add("execute", "Execute an approved request.", _execute)
    execute.add_argument("id", metavar="ID")


def _summary(message: approvals_pb2.ApprovalRequest) -> str:
    data = request_json(message)
    return (
        f"{data['id']} {data['state']}: {data['action']} {data['target']} by {data['requester']} "
        f"({len(data['approvals'])} of {data['required_approvals']} approvals, expires {data['expire_time']})"
    )


def _one(message: approvals_pb2.ApprovalRequest) -> Outcome:
    from kmsctl.cli import Outcome

    return Outcome(request_json(message), _summary(message))


def _request_destroy(args: argparse.Namespace, client: KmsClient) -> Outcome:
    name = args.name if args.name.startswith("keys/") else f"keys/{args.name}"
    return _one(ApprovalClient.of(client).request_destroy(name, args.delay))


def _list(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    requests = ApprovalClient.of(client).list(args.state)
    return Outcome(
        {"requests": [request_json(r) for r in requests]},
        "\n".join(_summary(r) for r in requests) or "no approval requests",
    )


def _approve(args: argparse.Namespace, client: KmsClient) -> Outcome:
    return _one(ApprovalClient.of(client).approve(args.id))


def _reject(args: argparse.Namespace, client: KmsClient) -> Outcome:
    return _one(ApprovalClient.of(client).reject(args.id, args.reason))


def _execute(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    response = ApprovalClient.of(client).execute(args.id)
    if response.HasField("slot"):  # a Secure Boot V2 slot revocation
        from kmsctl._slots_cli import executed_revocation

        return executed_revocation(response)
    if response.HasField("floor"):  # an anti-rollback floor lowering
        from kmsctl._floor_cli import executed_lowering

        return executed_lowering(response)
    if response.HasField("device"):  # a device opened for re-provisioning
        from kmsctl._reprovision_cli import executed_reprovisioning

        return executed_reprovisioning(response)
    if response.HasField("policy"):  # an authorization policy change
        from kmsctl._policy_cli import executed_policy_change

        return executed_policy_change(response)
    scheduled = {s.key_version: _time(s, "destroy_time") for s in response.key.scheduled_destructions}
    data = {"request": request_json(response.request), "scheduled_destructions": scheduled}
    target = response.request.target
    when = scheduled.get(target)
    return Outcome(data, f"{_summary(response.request)}\n{target} will be destroyed at {when}")
