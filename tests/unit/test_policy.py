"""Product scope: the policy file, identity matching, ``require_product``, and the full authorization matrix.

The matrix test crosses every RPC of ``METHOD_ROLES`` with every role and with a caller scoped to the
product the call touches, to another product, and to every product. The role dimension is the
interceptor's table; the product dimension is the real use case (``kms.service``) over in-memory fakes. A
cell is denied exactly when ``PermissionDenied`` comes out; an allowed cell may fail later for another
reason (the fakes hold no keys or releases), which shows the scope check let it through.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest

from kms.domain.devices import Device, DeviceState, WrappedSecret
from kms.domain.errors import InvalidArgument, KmsError, NotFound, PermissionDenied
from kms.domain.identity import Caller, Role
from kms.domain.keys import Algorithm, Key, KeyPurpose
from kms.domain.policy import UNSCOPED, ProductPolicy, ScopeRule, in_scope, require_product, scoped_caller
from kms.domain.ports import (
    DeviceRepository,
    Hsm,
    ImageSource,
    KeyRepository,
    ReleaseRepository,
    SignatureLog,
)
from kms.domain.signatures import SignatureEncoding
from kms.server.auth import METHOD_ROLES
from kms.server.config import load_config
from kms.server.policy_file import load_policy, parse_policy
from kms.service.distribution import Distribution, PayloadFormat
from kms.service.registry import DeviceRegistry
from kms.service.signing import SigningService

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 1, tzinfo=UTC)
A, B = "p-a", "p-b"

# -- the policy file and matching ------------------------------------------------------------------------

POLICY = """
default = "none"

[identities]
"spiffe://kms.example/build-server/ci-7" = ["p-a"]
"spiffe://kms.example/build-server/*" = ["p-b", "p-c"]
"spiffe://kms.example/build-server/team-x/*" = ["p-x"]
"spiffe://kms.example/auditor/*" = "*"
"spiffe://kms.example/factory-registrar/nowhere" = []
"""


def _policy(text: str, tmp_path: Path) -> ProductPolicy:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return load_policy(path)


@pytest.mark.parametrize(
    ("identity", "scope"),
    [
        ("spiffe://kms.example/build-server/ci-7", {"p-a"}),  # exact beats a matching pattern
        ("spiffe://kms.example/build-server/ci-8", {"p-b", "p-c"}),
        ("spiffe://kms.example/build-server/team-x/ci-1", {"p-x"}),  # the longest prefix wins
        ("spiffe://kms.example/build-server/ci-7/sub", {"p-b", "p-c"}),  # exact means exact
        ("spiffe://kms.example/auditor/alice", None),  # "*": every product
        ("spiffe://kms.example/factory-registrar/nowhere", set()),
        ("spiffe://kms.example/build-server", set()),  # the prefix needs its "/"
        ("spiffe://kms.example/build-serverx/ci-1", set()),
        ("spiffe://other.example/build-server/ci-7", set()),  # default = "none"
    ],
)
def test_scope_of_identity(tmp_path: Path, identity: str, scope: set[str] | None) -> None:
    expected = None if scope is None else frozenset(scope)
    assert _policy(POLICY, tmp_path).scope_of(identity) == expected


def test_default_all_keeps_role_only_access_for_unlisted_identities(tmp_path: Path) -> None:
    policy = _policy(
        'default = "all"\n[identities]\n"spiffe://kms.dev/build-server/dev" = ["p-a"]\n', tmp_path
    )
    assert policy.scope_of("spiffe://kms.dev/auditor/dev") is None
    assert policy.scope_of("spiffe://kms.dev/build-server/dev") == frozenset({"p-a"})


def test_no_policy_file_scopes_nobody() -> None:
    assert load_policy(None) is UNSCOPED
    assert UNSCOPED.scope_of("spiffe://kms.dev/build-server/dev") is None


def test_rule_order_does_not_matter() -> None:
    rules = (ScopeRule("spiffe://d/r/*", frozenset({"a"})), ScopeRule("spiffe://d/r/x/*", frozenset({"b"})))
    for order in (rules, rules[::-1]):
        assert ProductPolicy(order, default_all=False).scope_of("spiffe://d/r/x/y") == frozenset({"b"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "default must be"),
        ('default = "some"', "default must be"),
        ('default = "all"\nextra = 1', "unknown key"),
        ('default = "all"\nidentities = 3', "must be a table"),
        ('default = "all"\n[identities]\n"spiffe://d/r/x" = "p-a"', "list of product names"),
        ('default = "all"\n[identities]\n"spiffe://d/r/x" = [1]', "list of product names"),
        ('default = "all"\n[identities]\n"https://d/r/x" = ["p-a"]', "not a spiffe://"),
        ('default = "all"\n[identities]\n"spiffe://" = ["p-a"]', "not a spiffe://"),
        ('default = "all"\n[identities]\n"spiffe://d/r*" = ["p-a"]', "may only end"),
        ('default = "all"\n[identities]\n"spiffe://d/*/x" = ["p-a"]', "may only end"),
        ('default = "all"\n[identities]\n"spiffe://*/*" = ["p-a"]', "may only end"),
        ('default = "all"\n[identities]\n"spiffe://d/r/x" = ["Bad Product"]', "malformed product"),
        ("default = ", "not valid TOML"),
    ],
)
def test_malformed_policy_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        _policy(text, tmp_path)


def test_duplicate_rules_are_refused() -> None:
    rule = ScopeRule("spiffe://d/r/x", frozenset({"a"}))
    with pytest.raises(InvalidArgument, match="more than once"):
        ProductPolicy((rule, rule))


def test_missing_policy_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read policy file"):
        load_policy(tmp_path / "absent.toml")


def test_parse_policy_from_a_decoded_document() -> None:
    policy = parse_policy({"default": "none", "identities": {"spiffe://d/r/*": "*"}})
    assert policy.scope_of("spiffe://d/r/x") is None
    assert policy.scope_of("spiffe://d/s/x") == frozenset()


CONFIG = """
[tls]
cert = "pki/server.pem"
key = "pki/server.key"
client_ca = "pki/ca.pem"
[hsm]
uri = "pkcs11:token=t"
"""


def test_config_policy_file_is_optional_and_relative_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "kms.toml"
    path.write_text(CONFIG, encoding="utf-8")
    assert load_config(path).policy_file is None
    path.write_text(CONFIG + '[policy]\nfile = "policy.toml"\n', encoding="utf-8")
    assert load_config(path).policy_file == tmp_path / "policy.toml"
    path.write_text(CONFIG + "[policy]\nfile = 3\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match=r"\[policy\] file"):
        load_config(path)


# -- require_product and scoped_caller -------------------------------------------------------------------


def test_require_product_names_the_product() -> None:
    caller = Caller("spiffe://kms.dev/build-server/dev", Role.BUILD_SERVER, frozenset({A}))
    require_product(caller, A)
    with pytest.raises(PermissionDenied, match=r"may not act for product 'p-b' \(its product scope: 'p-a'\)"):
        require_product(caller, B)
    nobody = Caller("spiffe://kms.dev/auditor/dev", Role.AUDITOR, frozenset())
    with pytest.raises(PermissionDenied, match="no product"):
        require_product(nobody, A)
    require_product(Caller("spiffe://kms.dev/auditor/dev", Role.AUDITOR), B)  # None: every product


def test_scoped_caller_attaches_the_scope(tmp_path: Path) -> None:
    caller = Caller("spiffe://kms.example/build-server/ci-7", Role.BUILD_SERVER)
    scoped = scoped_caller(caller, _policy(POLICY, tmp_path))
    assert scoped == Caller(caller.identity, caller.role, frozenset({A}))
    assert in_scope(scoped, A) and not in_scope(scoped, B)
    assert scoped_caller(caller, UNSCOPED).products is None


# -- the authorization matrix ----------------------------------------------------------------------------


def _key(key_id: str, product: str, purpose: KeyPurpose = KeyPurpose.DIGEST_SIGNING) -> Key:
    return Key(key_id, product, purpose, Algorithm.ECDSA_P256_SHA256, None, 1, (), NOW)


def _device(device_id: str, product: str) -> Device:
    secret = WrappedSecret("kek", 1, "aes-key-wrap", b"\0" * 40)
    return Device(device_id, product, "esp32c6", DeviceState.ACTIVE, secret, b"", "registrar", NOW)


class _Untouchable:
    """A port no allowed cell reaches with these fakes, and no denied cell may reach at all."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a use case touched {name} of a port it should not reach here")


class _Keys(_Untouchable):
    """Each product has one OTA manifest key (it signs no caller digest) and nothing else."""

    def __init__(self) -> None:
        self.keys = {f"{p}-manifest": _key(f"{p}-manifest", p, KeyPurpose.OTA_MANIFEST) for p in (A, B)}

    def get_key(self, key_id: str) -> Key:
        if key_id not in self.keys:
            raise NotFound(f"no key {key_id}")
        return self.keys[key_id]

    def list_keys(self, product: str | None = None) -> Sequence[Key]:
        return [k for k in self.keys.values() if product is None or k.product == product]

    def sbv2_keys(self, product: str) -> Sequence[Key]:
        return []


class _Devices(_Untouchable):
    def __init__(self) -> None:
        self.devices = {f"dev-{p}": _device(f"dev-{p}", p) for p in (A, B)}
        self.revoked: list[str] = []

    def get(self, device_id: str) -> Device:
        if device_id not in self.devices:
            raise NotFound(f"no device {device_id}")
        return self.devices[device_id]

    def revoke(self, device_id: str, at: datetime) -> Device:
        self.revoked.append(device_id)
        return self.devices[device_id]


class _Releases(_Untouchable):
    def get(self, output_sha256: bytes) -> Any:
        raise NotFound("no such release")


Operation = Callable[[Caller, str], object]


def _operations() -> dict[str, Operation]:
    """Every product-bound RPC as the use case its servicer calls, touching ``product``."""
    keys, devices, untouchable = _Keys(), _Devices(), _Untouchable()
    signing = SigningService(
        cast(Hsm, untouchable),
        cast(KeyRepository, keys),
        cast(ReleaseRepository, _Releases()),
        cast(SignatureLog, untouchable),
        max_image_size=1 << 20,
    )
    registry = DeviceRegistry(
        cast(Hsm, untouchable),
        cast(KeyRepository, keys),
        cast(DeviceRepository, devices),
        cast(SignatureLog, untouchable),
    )
    distribution = Distribution(
        cast(Hsm, untouchable),
        cast(KeyRepository, keys),
        cast(DeviceRepository, devices),
        cast(ReleaseRepository, _Releases()),
        cast(ImageSource, untouchable),
        cast(SignatureLog, untouchable),
    )

    def list_keys(caller: Caller, product: str) -> object:
        listed = signing.list_keys("", caller)
        if product not in {k.product for k in listed}:  # filtered out: the call sees nothing of product
            raise PermissionDenied(f"ListKeys showed no key of {product!r}")
        assert {k.product for k in listed} <= (caller.products or {A, B})
        return listed

    release = "releases/" + "00" * 32
    return {
        "/kmsapi.v1.SigningService/SignImage": lambda c, p: signing.sign_image(c, p, b"not an image"),
        "/kmsapi.v1.SigningService/SignDigest": lambda c, p: signing.sign_digest(
            c, f"keys/{p}-manifest", b"\0" * 32, Algorithm.ECDSA_P256_SHA256.hash, SignatureEncoding.RAW
        ),
        "/kmsapi.v1.KeyService/ListKeys": list_keys,
        "/kmsapi.v1.DeviceRegistryService/GetRegistrationKey": lambda c, p: registry.registration_key(p, c),
        "/kmsapi.v1.DeviceRegistryService/RegisterDevices": lambda c, p: registry.register(c, p, [], None),
        "/kmsapi.v1.DeviceRegistryService/GetDevice": lambda c, p: registry.get(f"dev-{p}", c),
        "/kmsapi.v1.DeviceRegistryService/RevokeDevice": lambda c, p: registry.revoke(c, f"dev-{p}"),
        "/kmsapi.v1.DistributionService/GetPayload": lambda c, p: distribution.payload(
            c, f"dev-{p}", release, PayloadFormat.FKSP_V1
        ),
    }


PRODUCT_BOUND = set(_operations())
NOT_PRODUCT_BOUND = {
    # Public keys are public; audit records span products; health and reflection carry no product.
    "/kmsapi.v1.KeyService/GetPublicKey",
    "/kmsapi.v1.AuditService/ExportAuditLog",
    "/kmsapi.v1.AuditService/GetAuditHead",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    # Key administration: not yet product-scoped (kms.service.keys and lifecycle; docs/authorization.md).
    *(m for m in METHOD_ROLES if m.startswith("/kmsapi.v1.KeyAdminService/")),
    # KEK rotation: an officer's act on a product's KEK, not yet product-scoped (kms.service.kek_rotation).
    *(m for m in METHOD_ROLES if m.startswith("/kmsapi.v1.KekRotationService/")),
    # Dual control: officers' requests and votes, not yet product-scoped (kms.service.approvals).
    *(m for m in METHOD_ROLES if m.startswith("/kmsapi.v1.ApprovalService/")),
    # Not yet product-scoped (being built).
    "/kmsapi.v1.KeyService/GetManifestKeyRollover",
    "/kmsapi.v1.SecureBootSlotService/ListSecureBootSlots",
    "/kmsapi.v1.RollbackFloorService/GetRollbackFloor",
    "/kmsapi.v1.PolicyService/GetAuthorizationPolicy",
}
SCOPES = {
    "in scope": frozenset({A}),
    "out of scope": frozenset({B}),
    "every product": None,
    "no product": frozenset(),
}


def test_every_rpc_is_classified_for_product_scope() -> None:
    assert PRODUCT_BOUND.isdisjoint(NOT_PRODUCT_BOUND)
    assert set(METHOD_ROLES) == PRODUCT_BOUND | NOT_PRODUCT_BOUND


def test_the_documented_product_bound_calls_are_the_checked_ones() -> None:
    doc = (ROOT / "docs" / "authorization.md").read_text(encoding="utf-8")
    section = doc.split("## Product scope", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^- `(/[^`]+)`:", section, re.MULTILINE)) == PRODUCT_BOUND


def _decide(method: str, caller: Caller, product: str) -> bool:
    """True if the call is allowed: the interceptor's role table, then the use case's scope check."""
    if caller.role not in METHOD_ROLES[method]:
        return False
    operation = _operations().get(method)
    if operation is None:
        return True
    try:
        operation(caller, product)
    except PermissionDenied:
        return False
    except KmsError:
        pass  # refused later, for another reason: the scope check let it through
    return True


@pytest.mark.parametrize("scope", sorted(SCOPES))
@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("method", sorted(METHOD_ROLES))
def test_authorization_matrix(method: str, role: Role, scope: str) -> None:
    caller = Caller(f"spiffe://kms.dev/{role.value}/dev", role, SCOPES[scope])
    role_allows = role in METHOD_ROLES[method]
    scope_allows = method not in PRODUCT_BOUND or caller.products is None or A in caller.products
    assert _decide(method, caller, A) is (role_allows and scope_allows)


def test_denied_cells_change_nothing() -> None:
    devices = _Devices()
    registry = DeviceRegistry(
        cast(Hsm, _Untouchable()),
        cast(KeyRepository, _Keys()),
        cast(DeviceRepository, devices),
        cast(SignatureLog, _Untouchable()),
    )
    officer_a = Caller("spiffe://kms.dev/security-officer/dev", Role.SECURITY_OFFICER, frozenset({A}))
    with pytest.raises(PermissionDenied, match="'p-b'"):
        registry.revoke(officer_a, "dev-p-b")
    assert devices.revoked == []
    registry.revoke(officer_a, "dev-p-a")
    assert devices.revoked == ["dev-p-a"]
