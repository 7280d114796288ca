"""The full authorization matrix against one running server, over mutual TLS: each role, RPC and scope.

``tests/unit/test_policy.py`` checks every cell over in-memory fakes: its ``_decide`` (the interceptor's
role table ``METHOD_ROLES``, then the use case's ``require_product``) must allow exactly what the role table
and its ``PRODUCT_BOUND`` and ``SYSTEM_BOUND`` say. This test expects the same of the running server, from
the same sets (``expected``), so the two tests cannot disagree; its roles come from the documented table
(docs/authorization.md, which ``tests/unit/test_authorization_doc.py`` holds equal to ``METHOD_ROLES``), so
a server that enforces anything else, a changed ``METHOD_ROLES`` entry included, fails here too.

The cells are real: one server with a ``[policy] file``, two products ``p-a`` and ``p-b`` (product key
sets, a Secure Boot V2 key, a registered device and a pending approval request each), and for every role
three client certificates:

- ``ROLE/matrix-a``, scoped to ``p-a``: calls naming ``p-a`` ("in scope") and ``p-b`` ("out of scope");
- ``ROLE/matrix-all``, every product (``"*"``): calls naming ``p-b`` ("every product"), which also shows that
  the out-of-scope refusals come from the scope and not from something missing in ``p-b``; the only caller
  that passes ``RequestPolicyChange``, which belongs to the service's own product ``kms``;
- ``ROLE/matrix-none``, no product (``[]``): calls naming ``p-a`` ("no product").

The devices and approval requests are made by two more identities with every product (``matrix-setup``),
so that the every-product officer is not the requester of the request it votes on.

Every method of ``METHOD_ROLES`` gets a minimal request per product (``REQUESTS``; a method without one fails
``test_every_method_has_a_request``), sent whatever its kind: client streams send their header first,
server streams are read up to their first response. A cell's outcome must be:

- refused by role: PERMISSION_DENIED from the interceptor ("may not call"), before the handler runs;
- refused by scope: PERMISSION_DENIED from ``require_product`` ("may not act for product"); for the two
  listings (``ListKeys``, ``ListApprovalRequests``) the refusal is filtering: OK, nothing of the product;
- allowed: any status that shows the scope check let the call through (OK, or the refusal of a request
  this minimal: NOT_FOUND, FAILED_PRECONDITION, ...); never PERMISSION_DENIED, UNAUTHENTICATED, or a server
  fault; a listing shows the product.

Requests are chosen so allowed cells change little and nothing that matters to a later cell (the outcome
of a cell is only "denied or not", so a later FAILED_PRECONDITION is fine): versions that do not exist,
an empty Secure Boot V2 slot, a floor that was never raised, an empty policy text (so no policy change is
ever requested, let alone executed), approval requests that can never gather the two approvals they need.

Where the running server disagrees with the matrix today, the cells are marked ``xfail(strict=True)``
(``KNOWN_GAPS``), so the gap stays visible and a fix turns them into failures until the mark is removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from kms.domain.identity import Role
from kms.domain.keys import SYSTEM_PRODUCT
from kms.server.auth import METHOD_ROLES
from kmsapi.v1 import (
    admin_pb2,
    approvals_pb2,
    audit_pb2,
    common_pb2,
    devices_pb2,
    kek_pb2,
    keys_pb2,
    policy_pb2,
    rollback_pb2,
    signing_pb2,
    slots_pb2,
)
from tests.support.authorization_doc import documented_roles
from tests.support.client_certs import client_identity, issue_client
from tests.support.kms_server import KeySpec, RunningKms, init_state, running_kms
from tests.support.officers import officer_channel
from tests.unit.test_policy import PRODUCT_BOUND, SYSTEM_BOUND, A, B

DOCUMENTED_ROLES = documented_roles()
KEYS = [KeySpec(f"{p}-sbv2", p, "ecdsa-p256", 0) for p in (A, B)]
CHIP = "esp32c6"
MISSING_VERSION = 99  # no key here has that many versions: lifecycle calls fail after the scope check


@dataclass(frozen=True)
class Scope:
    """A column of the matrix: which certificate of the role calls, for which product."""

    name: str  # the certificate ROLE/NAME
    products: frozenset[str] | None  # what the policy grants it (None: every product)
    product: str  # the product the requests name


SCOPES = {
    "in scope": Scope("matrix-a", frozenset({A}), A),
    "out of scope": Scope("matrix-a", frozenset({A}), B),
    "every product": Scope("matrix-all", None, B),
    "no product": Scope("matrix-none", frozenset(), A),
}
CERTIFICATES = {scope.name: scope.products for scope in SCOPES.values()}
SETUP = "matrix-setup"  # the registrar and the officer that make the devices and approval requests
SETUP_ROLES = (Role.FACTORY_REGISTRAR, Role.SECURITY_OFFICER)


def _policy_toml() -> str:
    lines = ['default = "none"', "", "[identities]"]
    for role in Role:
        for name, products in CERTIFICATES.items():
            grant = '"*"' if products is None else "[" + ", ".join(f'"{p}"' for p in sorted(products)) + "]"
            lines.append(f'"{client_identity(role.value, name)}" = {grant}')
    lines += [f'"{client_identity(role.value, SETUP)}" = "*"' for role in SETUP_ROLES]
    return "\n".join(lines) + "\n"


@dataclass
class Matrix:
    """The running server, what each product holds, and one channel per certificate (opened on first use)."""

    server: RunningKms
    devices: dict[str, str] = field(default_factory=dict)  # product -> a registered device
    approvals: dict[str, str] = field(default_factory=dict)  # product -> a pending approval request
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, role: Role, name: str) -> grpc.Channel:
        stem = f"{role.value}-{name}"
        if stem not in self.channels:
            self.channels[stem] = officer_channel(self.server, stem)
        return self.channels[stem]


# -- calling any method by its path ----------------------------------------------------------------------

# grpcio-reflection ships the v1alpha messages only; v1's are the same messages on the wire.
_SAME_WIRE_FORMAT = {"grpc.reflection.v1.": "grpc.reflection.v1alpha."}


def _descriptor(method: str) -> MethodDescriptor:
    """The method's descriptor: its kind (streaming or not) and its response type."""
    service, name = method.removeprefix("/").split("/")
    for prefix, same in _SAME_WIRE_FORMAT.items():
        if service.startswith(prefix):
            service = same + service.removeprefix(prefix)
    return descriptor_pool.Default().FindMethodByName(f"{service}.{name}")


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: tuple[Any, ...]  # the response, or a stream's first response; empty on error


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def call(channel: grpc.Channel, method: str, requests: Sequence[Message]) -> Outcome:
    """Call ``method`` with ``requests`` (one, or a client stream's messages); wait for its first answer."""
    descriptor = _descriptor(method)
    response_type: Any = GetMessageClass(descriptor.output_type)
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    factory: Any = kinds[(descriptor.client_streaming, descriptor.server_streaming)]
    stub = factory(method, request_serializer=_serialize, response_deserializer=response_type.FromString)
    argument: Any = iter(requests) if descriptor.client_streaming else requests[0]
    try:
        if not descriptor.server_streaming:
            return Outcome(grpc.StatusCode.OK, "", (stub(argument, timeout=30),))
        stream = stub(argument, timeout=30)
        first = next(stream, None)
        stream.cancel()  # a stream (Health/Watch) may go on: its first answer is enough
        return Outcome(grpc.StatusCode.OK, "", () if first is None else (first,))
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        return Outcome(error.code(), error.details() or "", ())


# -- a minimal request per method ------------------------------------------------------------------------

Requests = Callable[[Matrix, str], list[Message]]


def _one(build: Callable[[Matrix, str], Message]) -> Requests:
    return lambda m, p: [build(m, p)]


def _version(product: str) -> str:
    return f"keys/{product}-sbv2/versions/{MISSING_VERSION}"


def _sign_image(m: Matrix, p: str) -> list[Message]:
    """A header and 16 bytes that are no ESP image: the use case refuses them after its scope check."""
    header = signing_pb2.SignImageHeader(product=p, image_size=16)
    return [signing_pb2.SignImageRequest(header=header), signing_pb2.SignImageRequest(chunk=bytes(16))]


def _register_devices(m: Matrix, p: str) -> list[Message]:
    """A header and an empty batch: the scope is checked per batch, so the batch is needed."""
    return [
        devices_pb2.RegisterDevicesRequest(header=devices_pb2.RegisterDevicesHeader(product=p)),
        devices_pb2.RegisterDevicesRequest(devices=devices_pb2.DeviceRows(rows=[])),
    ]


def _reflection(m: Matrix, p: str) -> list[Message]:
    return [reflection_pb2.ServerReflectionRequest(list_services="")]


_KEYS, _ADMIN, _APPROVALS = (
    "/kmsapi.v1.KeyService/",
    "/kmsapi.v1.KeyAdminService/",
    "/kmsapi.v1.ApprovalService/",
)
_DEVICES, _KEK = "/kmsapi.v1.DeviceRegistryService/", "/kmsapi.v1.KekRotationService/"

REQUESTS: dict[str, Requests] = {
    "/kmsapi.v1.SigningService/SignImage": _sign_image,
    "/kmsapi.v1.SigningService/SignDigest": _one(
        lambda m, p: signing_pb2.SignDigestRequest(
            name=f"keys/{p}-sbv2", digest=common_pb2.Digest(sha256=bytes(32))
        )
    ),
    _KEYS + "GetPublicKey": _one(lambda m, p: keys_pb2.GetPublicKeyRequest(name=f"keys/{p}-sbv2")),
    _KEYS + "ListKeys": _one(lambda m, p: keys_pb2.ListKeysRequest(product=p)),
    _KEYS + "GetManifestKeyRollover": _one(
        lambda m, p: keys_pb2.GetManifestKeyRolloverRequest(product=p, trusted_key_id=bytes(32))
    ),
    "/kmsapi.v1.SecureBootSlotService/ListSecureBootSlots": _one(
        lambda m, p: slots_pb2.ListSecureBootSlotsRequest(product=p)
    ),
    "/kmsapi.v1.RollbackFloorService/GetRollbackFloor": _one(
        lambda m, p: rollback_pb2.GetRollbackFloorRequest(product=p)
    ),
    "/kmsapi.v1.PolicyService/GetAuthorizationPolicy": _one(
        lambda m, p: policy_pb2.GetAuthorizationPolicyRequest()
    ),
    _DEVICES + "GetRegistrationKey": _one(lambda m, p: devices_pb2.GetRegistrationKeyRequest(product=p)),
    _DEVICES + "RegisterDevices": _register_devices,
    _DEVICES + "GetDevice": _one(lambda m, p: devices_pb2.GetDeviceRequest(device_id=m.devices[p])),
    _DEVICES + "RevokeDevice": _one(lambda m, p: devices_pb2.RevokeDeviceRequest(device_id=m.devices[p])),
    "/kmsapi.v1.DistributionService/GetPayload": _one(
        lambda m, p: devices_pb2.GetPayloadRequest(device_id=m.devices[p], release="releases/" + "00" * 32)
    ),
    "/kmsapi.v1.AuditService/ExportAuditLog": _one(lambda m, p: audit_pb2.ExportAuditLogRequest(limit=1)),
    "/kmsapi.v1.AuditService/GetAuditHead": _one(lambda m, p: audit_pb2.GetAuditHeadRequest()),
    # A key that exists: refused (ALREADY_EXISTS) after the scope check, before anything is generated.
    _ADMIN + "CreateKey": _one(
        lambda m, p: admin_pb2.CreateKeyRequest(
            product=p, key_id=f"{p}-sbv2", purpose=common_pb2.DIGEST_SIGNING, algorithm="ecdsa-p256"
        )
    ),
    _ADMIN + "CreateProductKeySet": _one(lambda m, p: admin_pb2.CreateProductKeySetRequest(product=p)),
    _ADMIN + "RotateKey": _one(lambda m, p: admin_pb2.RotateKeyRequest(name=f"keys/{p}-sbv2")),
    _ADMIN + "UpdateKeyVersionState": _one(
        lambda m, p: admin_pb2.UpdateKeyVersionStateRequest(name=_version(p), state=common_pb2.ENABLED)
    ),
    _ADMIN + "SetPrimaryVersion": _one(lambda m, p: admin_pb2.SetPrimaryVersionRequest(name=_version(p))),
    _ADMIN + "ScheduleKeyVersionDestruction": _one(
        lambda m, p: admin_pb2.ScheduleKeyVersionDestructionRequest(name=_version(p))
    ),
    _ADMIN + "CancelKeyVersionDestruction": _one(
        lambda m, p: admin_pb2.CancelKeyVersionDestructionRequest(name=_version(p))
    ),
    _ADMIN + "SetRotationSchedule": _one(  # period 0: rotation on demand, as the key already is
        lambda m, p: admin_pb2.SetRotationScheduleRequest(name=f"keys/{p}-sbv2")
    ),
    _ADMIN + "ListKeyTransitions": _one(
        lambda m, p: admin_pb2.ListKeyTransitionsRequest(name=f"keys/{p}-sbv2")
    ),
    _KEK + "StartKekRotation": _one(lambda m, p: kek_pb2.StartKekRotationRequest(product=p)),
    _KEK + "GetKekRotation": _one(lambda m, p: kek_pb2.GetKekRotationRequest(product=p)),
    _APPROVALS + "RequestKeyVersionDestruction": _one(
        lambda m, p: approvals_pb2.RequestKeyVersionDestructionRequest(name=_version(p))
    ),
    _APPROVALS + "RequestSlotRevocation": _one(  # slot 2 is empty: nothing to revoke
        lambda m, p: approvals_pb2.RequestSlotRevocationRequest(product=p, slot=2)
    ),
    _APPROVALS + "RequestFloorLowering": _one(  # nothing was signed: there is no floor to lower
        lambda m, p: approvals_pb2.RequestFloorLoweringRequest(product=p, secure_version=0)
    ),
    _APPROVALS + "RequestDeviceReprovisioning": _one(
        lambda m, p: approvals_pb2.RequestDeviceReprovisioningRequest(
            device_id=m.devices[p], reason="authorization matrix"
        )
    ),
    # Empty: refused (INVALID_ARGUMENT) once the caller passed the scope check, so no change is requested.
    _APPROVALS + "RequestPolicyChange": _one(lambda m, p: approvals_pb2.RequestPolicyChangeRequest()),
    _APPROVALS + "ListApprovalRequests": _one(lambda m, p: approvals_pb2.ListApprovalRequestsRequest()),
    _APPROVALS + "ApproveRequest": _one(lambda m, p: approvals_pb2.ApproveRequestRequest(id=m.approvals[p])),
    _APPROVALS + "RejectRequest": _one(
        lambda m, p: approvals_pb2.RejectRequestRequest(id=m.approvals[p], reason="authorization matrix")
    ),
    _APPROVALS + "ExecuteRequest": _one(lambda m, p: approvals_pb2.ExecuteRequestRequest(id=m.approvals[p])),
    "/grpc.health.v1.Health/Check": _one(lambda m, p: health_pb2.HealthCheckRequest()),
    "/grpc.health.v1.Health/Watch": _one(lambda m, p: health_pb2.HealthCheckRequest()),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _reflection,
}

# Calls whose scope refusal is filtering, not PERMISSION_DENIED: the products the response shows.
LISTINGS: dict[str, Callable[[Any], set[str]]] = {
    _KEYS + "ListKeys": lambda r: {k.product for k in r.keys},
    _APPROVALS + "ListApprovalRequests": lambda r: {q.parameters["product"] for q in r.requests},
}

# The call reached its use case past the scope check, which refused the minimal request for another reason.
LET_THROUGH = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}


# Where the running server disagrees with the matrix (see the module docstring): each entry names a method,
# which of its cells disagree, and why. Empty: the server and the matrix agree on every cell.
KNOWN_GAPS: dict[str, tuple[Callable[[bool, bool], bool], str]] = {}  # (role allows, scope allows) -> gap?


def expected(method: str, role: Role, scope: Scope) -> tuple[bool, bool]:
    """Whether the documented role table allows the call, and whether the caller's scope does (as in
    ``tests/unit/test_policy.py::test_authorization_matrix``, which ``_decide`` must match)."""
    role_allows = role in DOCUMENTED_ROLES.get(method, frozenset())
    scope_allows = (
        method not in PRODUCT_BOUND
        or scope.products is None
        or (method not in SYSTEM_BOUND and scope.product in scope.products)
    )
    return role_allows, scope_allows


def _cells() -> Iterator[Any]:
    """Every (method, role, scope), with the known gaps marked."""
    for method in sorted(METHOD_ROLES):
        for role in Role:
            for scope, column in SCOPES.items():
                marks = []
                gap = KNOWN_GAPS.get(method)
                if gap is not None and gap[0](*expected(method, role, column)):
                    marks.append(pytest.mark.xfail(strict=True, reason=gap[1]))
                cell = f"{method.removeprefix('/')}-{role.value}-{scope}-{column.product}"
                yield pytest.param(method, role, scope, id=cell, marks=marks)


# -- the server ------------------------------------------------------------------------------------------


def _register(matrix: Matrix, product: str) -> str:
    """A device of ``product``, registered by the every-product setup registrar."""
    device_id = f"matrix-{product}-{os.urandom(3).hex()}"
    row = devices_pb2.DeviceRow(row=1, device_id=device_id, chip=CHIP, secret=os.urandom(32))
    requests = [
        devices_pb2.RegisterDevicesRequest(header=devices_pb2.RegisterDevicesHeader(product=product)),
        devices_pb2.RegisterDevicesRequest(devices=devices_pb2.DeviceRows(rows=[row])),
    ]
    outcome = call(matrix.channel(Role.FACTORY_REGISTRAR, SETUP), _DEVICES + "RegisterDevices", requests)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert outcome.responses[0].outcomes[0].status == devices_pb2.RowOutcome.CREATED
    return device_id


def _request_destruction(matrix: Matrix, product: str) -> str:
    """A pending request of ``product``: the one officer of each column that may approve it (the in-scope
    one on ``p-a``, the every-product one on ``p-b``) makes one approval of the two needed, so no cell
    ever executes it."""
    request = approvals_pb2.RequestKeyVersionDestructionRequest(name=f"keys/{product}-sbv2/versions/1")
    outcome = call(
        matrix.channel(Role.SECURITY_OFFICER, SETUP),
        _APPROVALS + "RequestKeyVersionDestruction",
        [request],
    )
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    created: approvals_pb2.ApprovalRequest = outcome.responses[0]
    assert created.required_approvals == 2
    return created.id


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    state: Path = tmp_path_factory.mktemp("kms-matrix")
    init_state(state, KEYS, product_sets=[A, B])
    (state / "policy.toml").write_text(_policy_toml(), encoding="utf-8")
    with (state / "kms.toml").open("a", encoding="utf-8") as config:
        config.write('\n[policy]\nfile = "policy.toml"\n')
    for role in Role:
        for name in CERTIFICATES:
            issue_client(state, role.value, name)
    for role in SETUP_ROLES:
        issue_client(state, role.value, SETUP)
    with running_kms(state, KEYS, init=False) as server:
        matrix = Matrix(server)
        try:
            for product in (A, B):
                matrix.devices[product] = _register(matrix, product)
                matrix.approvals[product] = _request_destruction(matrix, product)
            yield matrix
        finally:
            for channel in matrix.channels.values():
                channel.close()


# -- the tests -------------------------------------------------------------------------------------------


def test_every_method_has_a_request() -> None:
    """A method added to ``METHOD_ROLES`` needs a request here, or the matrix would skip it silently."""
    assert set(REQUESTS) == set(METHOD_ROLES) == set(DOCUMENTED_ROLES)
    assert set(LISTINGS) <= PRODUCT_BOUND - SYSTEM_BOUND


def test_every_method_is_served(matrix: Matrix) -> None:
    """Each method the table names exists on the server (an unserved one is UNIMPLEMENTED for every role)."""
    channel = matrix.channel(Role.AUDITOR, "matrix-all")
    outcome = call(
        channel, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", _reflection(matrix, A)
    )
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    served = {s.name for s in outcome.responses[0].list_services_response.service}
    unserved = {m.removeprefix("/").split("/")[0] for m in METHOD_ROLES} - served
    assert unserved == set()


@pytest.mark.parametrize(("method", "role", "scope"), list(_cells()))
def test_authorization_matrix(matrix: Matrix, method: str, role: Role, scope: str) -> None:
    column = SCOPES[scope]
    build = REQUESTS.get(method)
    assert build is not None, f"no request for {method}: add one to REQUESTS"
    role_allows, scope_allows = expected(method, role, column)
    outcome = call(matrix.channel(role, column.name), method, build(matrix, column.product))
    seen = f"{outcome.code.name}: {outcome.details}"
    listed = LISTINGS.get(method)
    if not role_allows:
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, seen
        assert f"may not call {method}" in outcome.details, seen  # the interceptor, before the handler
    elif listed is not None:  # the scope filters: the listing shows the product exactly when allowed
        assert outcome.code == grpc.StatusCode.OK, seen
        shown = column.product in listed(outcome.responses[0])
        assert shown is scope_allows, f"the listing {'shows' if shown else 'hides'} {column.product}"
    elif not scope_allows:
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, seen
        denied = SYSTEM_PRODUCT if method in SYSTEM_BOUND else column.product
        assert f"may not act for product {denied!r}" in outcome.details, seen  # require_product
    else:
        assert outcome.code in LET_THROUGH, seen
