"""Authentication and authorization, enforced in one place for all four kinds of RPC.

Transport: mutual TLS is mandatory (``require_client_auth=True``), so a call reaches this module only with a
client certificate chained to the configured client CA. The caller's identity is the certificate's first
``spiffe://`` URI SAN, ``spiffe://{trust domain}/{role}/{name}``; the role is its first path segment. A
certificate without such a SAN, or naming an unknown role, gets UNAUTHENTICATED.

Authorization: ``METHOD_ROLES`` maps every method the server exposes to the roles that may call it. A method
missing from the table is refused (deny by default). The interceptor wraps the method's handler, whatever its
kind, so streaming calls are checked exactly like unary ones, before any request message is read.

Product scope: the caller is scoped by the product policy in force at the time of the call
(``use_policy_source``); see ``kms.domain.policy`` and ``kms.service.policy``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import grpc

from kms.domain.errors import KmsError, Unauthenticated
from kms.domain.identity import Caller, Role
from kms.domain.policy import UNSCOPED, ProductPolicy, scoped_caller
from kms.server.errors import status_of

ALL_ROLES = frozenset(Role)

METHOD_ROLES: dict[str, frozenset[Role]] = {
    "/kmsapi.v1.SigningService/SignImage": frozenset({Role.BUILD_SERVER}),
    "/kmsapi.v1.SigningService/SignDigest": frozenset({Role.BUILD_SERVER}),
    "/kmsapi.v1.KeyService/GetPublicKey": ALL_ROLES,
    "/kmsapi.v1.KeyService/ListKeys": ALL_ROLES,
    "/kmsapi.v1.KeyService/GetManifestKeyRollover": ALL_ROLES,
    "/kmsapi.v1.SecureBootSlotService/ListSecureBootSlots": frozenset({Role.SECURITY_OFFICER, Role.AUDITOR}),
    "/kmsapi.v1.RollbackFloorService/GetRollbackFloor": frozenset(
        {Role.BUILD_SERVER, Role.SECURITY_OFFICER, Role.AUDITOR}
    ),
    "/kmsapi.v1.PolicyService/GetAuthorizationPolicy": frozenset({Role.SECURITY_OFFICER, Role.AUDITOR}),
    "/kmsapi.v1.DeviceRegistryService/GetRegistrationKey": frozenset({Role.FACTORY_REGISTRAR}),
    "/kmsapi.v1.DeviceRegistryService/RegisterDevices": frozenset({Role.FACTORY_REGISTRAR}),
    "/kmsapi.v1.DeviceRegistryService/GetDevice": frozenset(
        {Role.FACTORY_REGISTRAR, Role.SECURITY_OFFICER, Role.DISTRIBUTION_SERVER, Role.AUDITOR}
    ),
    "/kmsapi.v1.DeviceRegistryService/RevokeDevice": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.DistributionService/GetPayload": frozenset({Role.DISTRIBUTION_SERVER}),
    "/kmsapi.v1.AuditService/ExportAuditLog": frozenset({Role.SECURITY_OFFICER, Role.AUDITOR}),
    "/kmsapi.v1.AuditService/GetAuditHead": frozenset({Role.SECURITY_OFFICER, Role.AUDITOR}),
    "/kmsapi.v1.KeyAdminService/CreateKey": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KeyAdminService/CreateProductKeySet": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KeyAdminService/RotateKey": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KeyAdminService/UpdateKeyVersionState": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KeyAdminService/SetPrimaryVersion": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KeyAdminService/ScheduleKeyVersionDestruction": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KeyAdminService/CancelKeyVersionDestruction": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KeyAdminService/SetRotationSchedule": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KeyAdminService/ListKeyTransitions": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KekRotationService/StartKekRotation": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.KekRotationService/GetKekRotation": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/RequestKeyVersionDestruction": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/RequestSlotRevocation": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/RequestFloorLowering": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/RequestDeviceReprovisioning": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/RequestPolicyChange": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/ListApprovalRequests": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/ApproveRequest": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/RejectRequest": frozenset({Role.SECURITY_OFFICER}),
    "/kmsapi.v1.ApprovalService/ExecuteRequest": frozenset({Role.SECURITY_OFFICER}),
    "/grpc.health.v1.Health/Check": ALL_ROLES,
    "/grpc.health.v1.Health/Watch": ALL_ROLES,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ALL_ROLES,
}

_ROLES_BY_NAME = {role.value: role for role in Role}

PolicySource = Callable[[], ProductPolicy]
"""Returns the product policy in force; asked on every call, so it must be fast (it caches)."""


def _unscoped() -> ProductPolicy:
    return UNSCOPED


_policy_source: PolicySource = _unscoped


def use_policy_source(source: PolicySource) -> None:
    """Scope every caller by the policy ``source()`` returns at the time of the call (``kms.domain.policy``).

    The composition root calls it once, before the server starts, with
    ``AuthorizationPolicies.current`` (``kms.service.policy``): the newest policy installed under dual
    control, read again at most once a second, so a change applies without a restart.
    """
    global _policy_source  # set once at startup, before the server starts
    _policy_source = source


def use_product_policy(policy: ProductPolicy) -> None:
    """Scope every caller by one fixed ``policy`` (tests; a server uses ``use_policy_source``)."""
    use_policy_source(lambda: policy)


def caller_from_auth_context(auth_context: Mapping[str, Iterable[bytes]]) -> Caller:
    """The caller named by a TLS peer's certificate. Raises ``Unauthenticated``."""
    if list(auth_context.get("transport_security_type", ())) != [b"ssl"]:
        raise Unauthenticated("a TLS client certificate is required")
    for raw in auth_context.get("x509_subject_alternative_name", []):
        san = raw.decode("utf-8", "replace")
        if not san.startswith("spiffe://"):
            continue
        parts = san.removeprefix("spiffe://").split("/")
        role = _ROLES_BY_NAME.get(parts[1]) if len(parts) >= 3 else None
        if role is None:
            raise Unauthenticated(f"certificate identity {san!r} names no known role")
        return scoped_caller(Caller(identity=san, role=role), _policy_source())
    raise Unauthenticated("the client certificate carries no spiffe:// URI SAN identity")


def caller_of(context: grpc.ServicerContext) -> Caller:
    """The authenticated caller of an RPC. Raises ``Unauthenticated``."""
    # grpc returns {property: [values]}; types-grpcio declares the values as bytes, hence the cast.
    return caller_from_auth_context(cast(Mapping[str, Iterable[bytes]], context.auth_context()))


def _authorize(method: str, context: grpc.ServicerContext) -> None:
    try:
        caller = caller_of(context)
    except Unauthenticated as e:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
    except KmsError as e:  # the policy in force could not be read: fail closed, the client may retry
        context.abort(status_of(e), str(e))
    allowed = METHOD_ROLES.get(method)
    if allowed is None or caller.role not in allowed:
        context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"role {caller.role.value} ({caller.identity}) may not call {method}",
        )


def _guard(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    def guarded(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        _authorize(method, context)
        return behavior(request_or_iterator, context)

    return guarded


class AuthorizationInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for attribute, factory in kinds:
            behavior = getattr(handler, attribute)
            if behavior is not None:
                return factory(
                    _guard(method, behavior),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler
