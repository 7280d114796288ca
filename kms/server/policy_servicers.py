"""gRPC side of the authorization policy: ``PolicyService`` (kmsapi/v1/policy.proto) and ``ChangePolicy``, the
act of ``ApprovalService.RequestPolicyChange`` under dual control.

``GetAuthorizationPolicy`` returns the policy in force (``AuthorizationPolicies.in_force``), to security
officers and auditors whatever their product scope: the policy spans every product, as the audit log does,
and an officer must be able to read why it is scoped. ``ChangePolicy.prepare`` checks the proposed text and
records its SHA-256 and the version it changes as the request's parameters; ``execute`` installs exactly that
text (``kms.service.policy``). The request belongs to ``SYSTEM_PRODUCT``: only officers with every product
request, approve and execute policy changes (``kms.domain.policy``). A version installed by ``kms policy
reset`` (break glass, on a server host) shows ``updated_by`` "local:USER" and ``update_request``
"break-glass".
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kms.domain.approvals import PRODUCT_PARAMETER, ApprovalRequest
from kms.domain.identity import Caller
from kms.domain.keys import SYSTEM_PRODUCT
from kms.domain.policy import StoredPolicy
from kms.server.audit_interceptor import note
from kms.server.errors import translate_errors
from kms.service.policy import BREAK_GLASS, AuthorizationPolicies, proposal_from
from kmsapi.v1 import approvals_pb2, policy_pb2, policy_pb2_grpc

POLICY_TARGET = "authorization-policy"
SHA256_PARAMETER = "policy_sha256"
BASE_VERSION_PARAMETER = "base_version"
BASE_SHA256_PARAMETER = "base_sha256"


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _update_request(policy: StoredPolicy) -> str:
    """``approvals/ID``; ``break-glass`` for a version ``kms policy reset`` installed (no request: it names
    no approval resource on purpose, so no client looks one up)."""
    if policy.approval_id == BREAK_GLASS:
        return BREAK_GLASS
    return f"approvals/{policy.approval_id}" if policy.approval_id else ""


def policy_pb(policy: StoredPolicy) -> policy_pb2.AuthorizationPolicy:
    message = policy_pb2.AuthorizationPolicy(
        version=policy.version,
        toml=policy.text,
        sha256=policy.sha256,
        updated_by=policy.created_by,
        update_request=_update_request(policy),
    )
    if policy.created_at is not None:
        message.update_time.CopyFrom(_timestamp(policy.created_at))
    return message


class ChangePolicy:
    """The act of a policy change (a ``GatedAct``): propose the text at request time, install it once
    approved."""

    def __init__(self, policies: AuthorizationPolicies) -> None:
        self._policies = policies

    def prepare(
        self, caller: Caller, message: approvals_pb2.RequestPolicyChangeRequest
    ) -> tuple[str, dict[str, str]]:
        note(product=SYSTEM_PRODUCT)
        proposal = self._policies.propose(caller, message.policy_toml)
        return POLICY_TARGET, {
            PRODUCT_PARAMETER: SYSTEM_PRODUCT,
            SHA256_PARAMETER: proposal.sha256.hex(),
            BASE_VERSION_PARAMETER: str(proposal.base_version),
            BASE_SHA256_PARAMETER: proposal.base_sha256.hex(),
        }

    def execute(self, caller: Caller, request: ApprovalRequest) -> approvals_pb2.ExecuteRequestResponse:
        parameters = request.parameters
        proposal = proposal_from(
            parameters.get(SHA256_PARAMETER, ""),
            parameters.get(BASE_VERSION_PARAMETER, ""),
            parameters.get(BASE_SHA256_PARAMETER, ""),
        )
        installed = self._policies.install(caller, proposal, request.id)
        return approvals_pb2.ExecuteRequestResponse(policy=policy_pb(installed))


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, policies: AuthorizationPolicies) -> None:
        self._policies = policies

    @translate_errors
    def GetAuthorizationPolicy(  # noqa: N802 - gRPC method name
        self, request: policy_pb2.GetAuthorizationPolicyRequest, context: grpc.ServicerContext
    ) -> policy_pb2.AuthorizationPolicy:
        note(product=SYSTEM_PRODUCT, resource=POLICY_TARGET)
        if request.draft_sha256:
            text = self._policies.draft(request.draft_sha256)
            return policy_pb2.AuthorizationPolicy(
                toml=text, sha256=hashlib.sha256(text.encode("utf-8")).digest(), draft=True
            )
        return policy_pb(self._policies.in_force())


def add_policy(server: grpc.Server, policies: AuthorizationPolicies) -> None:
    """Serve ``PolicyService`` on ``server`` (the act ``ChangePolicy`` goes to ``add_approvals``)."""
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(policies), server)
