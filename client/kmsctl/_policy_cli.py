"""``kmsctl policy``: the authorization policy in force, and proposing a change (security officers).

    kmsctl policy show [--json]
    kmsctl policy propose FILE

``show`` prints the policy in force (``PolicyService.GetAuthorizationPolicy``; auditors may call it too,
with ``--identity auditor``): its TOML text, then its version, SHA-256 and who installed it through which
approval request, as TOML comments, so ``kmsctl policy show --quiet > policy.toml`` gives exactly the text
to edit and propose. Version 0 is the server's ``[policy]`` file (empty without one: no product scope).

``propose`` asks for the policy in FILE to replace it (``ApprovalService.RequestPolicyChange``). The server
checks the text at once (TOML in the policy file format, at most 64 KiB, no officer lock-out) and creates an
approval request; other officers approve it and one executes it with ``kmsctl approvals``. The request
carries the text's SHA-256 (``policy_sha256``), not the text: approvers compare it with the SHA-256 of the
file they were sent (``sha256sum FILE``) before approving. Only officers who act for every product may
propose, approve or execute a policy change.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from kmsapi.v1 import approvals_pb2, policy_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

SECURITY_OFFICER = "security-officer"

Command = Callable[[argparse.Namespace, "KmsClient"], "Outcome"]


def policy_json(message: policy_pb2.AuthorizationPolicy) -> dict[str, Any]:
    """The policy in force as ``--json`` prints it."""
    update_time = None
    if message.HasField("update_time"):
        update_time = message.update_time.ToDatetime(tzinfo=UTC).isoformat()
    return {
        "version": message.version,
        "toml": message.toml,
        "sha256": message.sha256.hex(),
        "update_time": update_time,
        "updated_by": message.updated_by or None,
        "update_request": message.update_request or None,
    }


class PolicyClient:
    """The policy calls, over a ``KmsClient``'s connection (``PolicyClient.of(client)``). A proposal is not
    retried: a repeat would make a second approval request."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout

    @classmethod
    def of(cls, client: KmsClient) -> PolicyClient:
        return cls(client._channel, client._timeout)

    def _call(self, descriptor: Any, service: str, method: str, request: Any, response_type: Any) -> Any:
        from kmsctl import _wire

        rpc = self._channel.unary_unary(
            _wire.method_path(descriptor, service, method),
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return rpc(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise _wire.translate(error) from error

    def get(self) -> policy_pb2.AuthorizationPolicy:
        from kmsapi.v1 import policy_pb2

        result: policy_pb2.AuthorizationPolicy = self._call(
            policy_pb2.DESCRIPTOR,
            "PolicyService",
            "GetAuthorizationPolicy",
            policy_pb2.GetAuthorizationPolicyRequest(),
            policy_pb2.AuthorizationPolicy,
        )
        return result

    def propose(self, policy_toml: str) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        result: approvals_pb2.ApprovalRequest = self._call(
            approvals_pb2.DESCRIPTOR,
            "ApprovalService",
            "RequestPolicyChange",
            approvals_pb2.RequestPolicyChangeRequest(policy_toml=policy_toml),
            approvals_pb2.ApprovalRequest,
        )
        return result


def add_policy_commands(commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``policy show|propose`` to the top-level ``commands`` subparsers; ``common_parents`` are the
    connection and output option parsers every command shares."""
    from kmsctl.cli import _EXIT_CODES_HELP

    policy = commands.add_parser(
        "policy",
        help="Show the authorization policy, propose a change under dual control (officers).",
        description="The authorization policy (product scope of each identity) and changes to it.",
    )
    sub_commands = policy.add_subparsers(title="commands", metavar="COMMAND", required=True)

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

    add("show", "Print the policy in force (TOML, then its version as comments).", _show)
    propose = add("propose", "Request that the policy in FILE replace the one in force.", _propose)
    propose.add_argument("file", metavar="FILE", help="the whole new policy, in the [policy] file format")


def _describe(data: dict[str, Any]) -> str:
    if data["version"] == 0:
        origin = "the server's [policy] file" if data["toml"] else "no policy: every identity, every product"
        return f"# version 0 ({origin})\n# sha256 {data['sha256']}"
    return (
        f"# version {data['version']}, installed {data['update_time']} by {data['updated_by']} "
        f"({data['update_request']})\n# sha256 {data['sha256']}"
    )


def _show(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    data = policy_json(PolicyClient.of(client).get())
    text = data["toml"]
    payload = text if not text or text.endswith("\n") else text + "\n"
    return Outcome(data, _describe(data), payload=payload)


def executed_policy_change(response: approvals_pb2.ExecuteRequestResponse) -> Outcome:
    """The outcome of ``kmsctl approvals execute`` for a policy change: the request and the policy now in
    force (``ExecuteRequestResponse.policy``)."""
    from kmsctl._approvals_cli import request_json
    from kmsctl.cli import Outcome

    policy = policy_json(response.policy)
    data = {"request": request_json(response.request), "policy": policy}
    summary = (
        f"approval request {response.request.id} executed: authorization policy version {policy['version']} "
        f"(sha256 {policy['sha256']}) is in force; every server applies it within about a second"
    )
    return Outcome(data, summary)


def _propose(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl._approvals_cli import request_json
    from kmsctl.cli import BadInputError, Outcome

    raw = Path(args.file).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInputError(f"{args.file} is not UTF-8 text: {error}") from None
    created = PolicyClient.of(client).propose(text)
    digest = hashlib.sha256(raw).hexdigest()
    data = {**request_json(created), "policy_sha256": digest}
    summary = (
        f"approval request {created.id} created by {created.requester}: {created.required_approvals} other "
        f"officer(s) must approve it ('kmsctl approvals approve {created.id}'), then one executes it\n"
        f"policy SHA-256 {digest}: approvers compare it with the file they were sent (sha256sum FILE)"
    )
    return Outcome(data, summary)
