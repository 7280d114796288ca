"""``kmsctl policy``: the authorization policy in force, a proposed one, and proposing a change (security
officers).

    kmsctl policy show [--draft SHA256HEX] [--json]
    kmsctl policy propose FILE

``show`` prints the policy in force (``PolicyService.GetAuthorizationPolicy``; auditors may call it too,
with ``--identity auditor``): its TOML text, then its version, SHA-256 and who installed it through which
approval request, as TOML comments, so ``kmsctl policy show --quiet > policy.toml`` gives exactly the text
to edit and propose. Version 0 is the server's ``[policy]`` file (empty without one: no product scope).

``propose`` asks for the policy in FILE to replace it (``ApprovalService.RequestPolicyChange``). The server
checks the text at once (TOML in the policy file format, at most 64 KiB, no officer lock-out) and creates an
approval request; other officers approve it and one executes it with ``kmsctl approvals``. The request
carries the text's SHA-256 (its ``policy_sha256`` parameter), not the text. ``show --draft SHA256HEX`` prints
the text proposed under that SHA-256, as the server will install it, so approvers read exactly what they
approve; the SHA-256 of the text received is checked here (exit 8 if it differs), and ``--json`` marks it
``"draft": true``. Only officers who act for every product may propose, approve or execute a policy change.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kmsctl import _officer_cli

if TYPE_CHECKING:
    from kmsapi.v1 import approvals_pb2, policy_pb2
    from kmsctl._client import KmsClient
    from kmsctl.cli import Outcome

# kmsctl.cli imports this module; what this module needs of it is imported inside the functions.

#: The parameter of a policy change request that holds the proposed text's SHA-256, in hex
#: (``kms.server.policy_servicers.SHA256_PARAMETER``).
POLICY_SHA256_PARAMETER = "policy_sha256"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def policy_json(message: policy_pb2.AuthorizationPolicy) -> dict[str, Any]:
    """The policy in force as ``--json`` prints it."""
    return {
        "version": message.version,
        "toml": message.toml,
        "sha256": message.sha256.hex(),
        "update_time": _officer_cli.iso_time(message, "update_time"),
        "updated_by": message.updated_by or None,
        "update_request": message.update_request or None,
    }


def draft_command(sha256_hex: str) -> str:
    """The command that prints the policy proposed under ``sha256_hex`` (a request's ``policy_sha256``)."""
    return f"kmsctl policy show --draft {sha256_hex}"


class PolicyClient:
    """The policy calls, over a ``KmsClient``'s connection (``PolicyClient(client)``). A proposal is not
    retried: a repeat would make a second approval request."""

    def __init__(self, client: KmsClient) -> None:
        self._client = client

    def _get(self, request: policy_pb2.GetAuthorizationPolicyRequest) -> policy_pb2.AuthorizationPolicy:
        from kmsapi.v1 import policy_pb2

        return _officer_cli.call(
            self._client,
            policy_pb2.DESCRIPTOR,
            "PolicyService",
            "GetAuthorizationPolicy",
            request,
            policy_pb2.AuthorizationPolicy,
        )

    def get(self) -> policy_pb2.AuthorizationPolicy:
        from kmsapi.v1 import policy_pb2

        return self._get(policy_pb2.GetAuthorizationPolicyRequest())

    def draft(self, sha256: bytes) -> str:
        """The policy text proposed under ``sha256`` (``NotFoundError`` if none was). ``IntegrityError`` if
        the text received does not hash to ``sha256``: it is not what the request would install."""
        from kmsapi.v1 import policy_pb2
        from kmsctl.errors import IntegrityError, UnimplementedError

        message = self._get(policy_pb2.GetAuthorizationPolicyRequest(draft_sha256=sha256))
        if not message.draft:  # a server older than the field answers with the policy in force
            raise UnimplementedError(
                "the server does not serve proposed policies (it is older than kmsctl)", code="UNIMPLEMENTED"
            )
        received = hashlib.sha256(message.toml.encode("utf-8")).digest()
        if received != sha256:
            raise IntegrityError(
                f"the proposed policy received hashes to {received.hex()}, not {sha256.hex()}: it is not the "
                "text the request names; do not approve on the strength of it"
            )
        return message.toml

    def propose(self, policy_toml: str) -> approvals_pb2.ApprovalRequest:
        from kmsapi.v1 import approvals_pb2

        request = approvals_pb2.RequestPolicyChangeRequest(policy_toml=policy_toml)
        return _officer_cli.request_approval(self._client, "RequestPolicyChange", request)


def add_policy_commands(commands: Any, common_parents: list[argparse.ArgumentParser]) -> None:
    """Add ``policy show|propose`` to the top-level ``commands`` subparsers; ``common_parents`` are the
    connection and output option parsers every command shares."""
    policy = _officer_cli.CommandGroup(
        commands,
        common_parents,
        "policy",
        "Show the authorization policy, propose a change under dual control (officers).",
        "The authorization policy (product scope of each identity) and changes to it.",
    )
    show = policy.add("show", "Print the policy in force (TOML, then its version as comments).", _show)
    show.add_argument(
        "--draft",
        metavar="SHA256HEX",
        help="print the policy proposed under this SHA-256 instead (its request's policy_sha256 parameter)",
    )
    propose = policy.add("propose", "Request that the policy in FILE replace the one in force.", _propose)
    propose.add_argument("file", metavar="FILE", help="the whole new policy, in the [policy] file format")


def _describe(data: dict[str, Any]) -> str:
    if data["version"] == 0:
        origin = "the server's [policy] file" if data["toml"] else "no policy: every identity, every product"
        return f"# version 0 ({origin})\n# sha256 {data['sha256']}"
    return (
        f"# version {data['version']}, installed {data['update_time']} by {data['updated_by']} "
        f"({data['update_request']})\n# sha256 {data['sha256']}"
    )


def _text(toml: str) -> str:
    """``toml`` as printed on stdout: ending with a newline unless empty."""
    return toml if not toml or toml.endswith("\n") else toml + "\n"


def _sha256(text: str) -> bytes:
    from kmsctl.cli import BadInputError

    if _SHA256_HEX.fullmatch(text) is None:
        raise BadInputError(
            f"--draft expects 64 hex digits (the {POLICY_SHA256_PARAMETER} of a policy change request), "
            f"not {text!r}"
        )
    return bytes.fromhex(text)


def _show(args: argparse.Namespace, client: KmsClient) -> Outcome:
    from kmsctl.cli import Outcome

    if args.draft is not None:
        sha256 = _sha256(args.draft)
        toml = PolicyClient(client).draft(sha256)
        data = {"draft": True, "toml": toml, "sha256": sha256.hex()}
        comment = (
            "# proposed, not in force: what the policy change request with this SHA-256 installs once "
            f"executed\n# sha256 {sha256.hex()}"
        )
        return Outcome(data, comment, payload=_text(toml))
    message = PolicyClient(client).get()
    data = policy_json(message)
    return Outcome(data, _describe(data), payload=_text(message.toml))


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
    created = PolicyClient(client).propose(text)
    digest = hashlib.sha256(raw).hexdigest()
    data = {**request_json(created), "policy_sha256": digest}
    summary = (
        f"approval request {created.id} created by {created.requester}: {created.required_approvals} other "
        f"officer(s) must approve it ('kmsctl approvals approve {created.id}'), then one executes it\n"
        f"policy SHA-256 {digest}: approvers read the proposed text with '{draft_command(digest)}'"
    )
    return Outcome(data, summary)
