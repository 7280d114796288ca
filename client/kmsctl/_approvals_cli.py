"""``kmsctl approvals``: dual control of acts that destroy or weaken (security officers).

    kmsctl approvals request-destroy VERSION [--delay DURATION]
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
for ``execute``, the act's result) as JSON. For a policy change, the lines for people add the command that
prints the proposed text (``kmsctl policy show --draft SHA256HEX``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from kmsctl import _officer_cli
from kmsctl._officer_cli import iso_time

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from kmsapi.v1 import approvals_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

STATES = ("pending", "approved", "rejected", "expired", "executed")


def request_json(message: approvals_pb2.ApprovalRequest) -> dict[str, Any]:
    """An approval request as ``--json`` prints it."""
    from kmsapi.v1 import approvals_pb2

    def votes(items: Any) -> list[dict[str, Any]]:
        return [
            {"officer": v.officer, "time": iso_time(v, "time"), **({"reason": v.reason} if v.reason else {})}
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
        "create_time": iso_time(message, "create_time"),
        "expire_time": iso_time(message, "expire_time"),
        "required_approvals": message.required_approvals,
        "approvals": votes(message.approvals),
        "rejections": votes(message.rejections),
        "state": state.lower(),
        "execute_time": iso_time(message, "execute_time"),
        "executed_by": message.executed_by or None,
    }


class ApprovalClient:
    """The ApprovalService calls, over a ``KmsClient``'s connection (``ApprovalClient(client)``).
    None is retried: votes and executions are not meant to be repeated blindly (list first)."""

    def __init__(self, client: KmsClient) -> None:
        self._client = client

    def _call(self, method: str, request: Message, reply: type[_officer_cli.Reply]) -> _officer_cli.Reply:
        from kmsapi.v1 import approvals_pb2

        return _officer_cli.call(
            self._client, approvals_pb2.DESCRIPTOR, "ApprovalService", method, request, reply
        )

    def request_destroy(
        self, version: str, delay_seconds: int | None = None
    ) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        request = approvals_pb2.RequestKeyVersionDestructionRequest(name=version)
        if delay_seconds is not None:
            request.delay_seconds = delay_seconds
        return _officer_cli.request_approval(self._client, "RequestKeyVersionDestruction", request)

    def list(self, state: str | None = None) -> list[approvals_pb2.ApprovalRequest]:
        from kmsapi.v1 import approvals_pb2

        number = approvals_pb2.ApprovalState.Value(f"APPROVAL_STATE_{state.upper()}") if state else 0
        response = self._call(
            "ListApprovalRequests",
            approvals_pb2.ListApprovalRequestsRequest(state=number),  # type: ignore[arg-type]
            approvals_pb2.ListApprovalRequestsResponse,
        )
        return list(response.requests)

    def approve(self, request_id: str) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        return self._call(
            "ApproveRequest",
            approvals_pb2.ApproveRequestRequest(id=request_id),
            approvals_pb2.ApprovalRequest,
        )

    def reject(self, request_id: str, reason: str) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        return self._call(
            "RejectRequest",
            approvals_pb2.RejectRequestRequest(id=request_id, reason=reason),
            approvals_pb2.ApprovalRequest,
        )

    def execute(self, request_id: str) -> approvals_pb2.ExecuteRequestResponse:
        from kmsapi.v1 import approvals_pb2

        return self._call(
            "ExecuteRequest",
            approvals_pb2.ExecuteRequestRequest(id=request_id),
            approvals_pb2.ExecuteRequestResponse,
        )


def add_approval_commands(commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``approvals request-destroy|list|approve|reject|execute`` to the top-level ``commands``
    subparsers; ``common_parents`` are the connection and output option parsers every command shares."""
    approvals = _officer_cli.CommandGroup(
        commands,
        common_parents,
        "approvals",
        "Dual control: request, approve, reject and execute destructive acts (officers).",
        "Dual control: acts that destroy need the approval of other security officers.",
    )

    destroy = approvals.add("request-destroy", "Request the destruction of a key version.", _request_destroy)
    destroy.add_argument("name", metavar="VERSION", help="keys/ID/versions/N or ID/versions/N")
    destroy.add_argument(
        "--delay",
        type=_delay_seconds,
        metavar="DURATION",
        help="destruction delay once executed: seconds or 90m, 24h, 30d; 1h to 120d (default 24h)",
    )
    listing = approvals.add("list", "List approval requests, oldest first.", _list)
    listing.add_argument("--state", choices=STATES, help="only requests in this state")
    approve = approvals.add("approve", "Approve another officer's request.", _approve)
    approve.add_argument("id", metavar="ID")
    reject = approvals.add("reject", "Reject a request for good.", _reject)
    reject.add_argument("id", metavar="ID")
    reject.add_argument("--reason", required=True, help="why (recorded with the vote)")
    execute = approvals.add("execute", "Execute an approved request.", _execute)
    execute.add_argument("id", metavar="ID")


def _summary(message: approvals_pb2.ApprovalRequest) -> str:
    """A request for people, in one line; for a policy change a second one names the command that prints the
    proposed policy, which approvers read before they vote."""
    from kmsapi.v1 import approvals_pb2
    from kmsctl._policy_cli import POLICY_SHA256_PARAMETER, draft_command

    data = request_json(message)
    line = (
        f"{data['id']} {data['state']}: {data['action']} {data['target']} by {data['requester']} "
        f"({len(data['approvals'])} of {data['required_approvals']} approvals, expires {data['expire_time']})"
    )
    proposed = message.parameters.get(POLICY_SHA256_PARAMETER)
    if message.action == approvals_pb2.APPROVAL_ACTION_CHANGE_AUTHORIZATION_POLICY and proposed:
        line += f"\n  proposed policy: {draft_command(proposed)}"
    return line


def _one(message: approvals_pb2.ApprovalRequest) -> Outcome:
    from kmsctl.cli import Outcome

    return Outcome(request_json(message), _summary(message))


def _delay_seconds(text: str) -> int:
    from kmsctl._admin_cli import _duration

    return int(_duration(text).total_seconds())


def _request_destroy(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl._officer_cli import requested

    name = args.name if args.name.startswith("keys/") else f"keys/{args.name}"
    return requested(ApprovalClient(client).request_destroy(name, args.delay), f"the destruction of {name}")


def _list(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    requests = ApprovalClient(client).list(args.state)
    return Outcome(
        {"requests": [request_json(r) for r in requests]},
        "\n".join(_summary(r) for r in requests) or "no approval requests",
    )


def _approve(args: argparse.Namespace, client: KmsClient) -> Outcome:
    return _one(ApprovalClient(client).approve(args.id))


def _reject(args: argparse.Namespace, client: KmsClient) -> Outcome:
    return _one(ApprovalClient(client).reject(args.id, args.reason))


def _execute(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    response = ApprovalClient(client).execute(args.id)
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
    scheduled = {s.key_version: iso_time(s, "destroy_time") for s in response.key.scheduled_destructions}
    data = {"request": request_json(response.request), "scheduled_destructions": scheduled}
    target = response.request.target
    when = scheduled.get(target)
    return Outcome(data, f"{_summary(response.request)}\n{target} will be destroyed at {when}")
