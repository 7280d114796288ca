"""The security officer's key administration against the real server: SoftHSM2, SQLite, gRPC over mTLS.

Rotation is "old still verifies until disabled" (as tink tests it): after a rotation new signatures name
version 2 and version 1's signatures still verify with version 1's public key; once version 1 is disabled,
nothing signs with it, from the next call on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from kms.domain.identity import Role
from kms.server.auth import METHOD_ROLES
from kmsapi.v1 import admin_pb2, admin_pb2_grpc
from kmsctl import FailedPreconditionError, KmsClient
from kmsctl._admin import KeyAdminClient, TransitionEvent
from kmsctl._models import KeyVersionState
from tests.support.kms_server import RunningKms

OFFICER = "spiffe://kms.dev/security-officer/dev"
SERVICE = admin_pb2.DESCRIPTOR.services_by_name["KeyAdminService"]


@pytest.fixture
def officer(kms_server: RunningKms) -> Iterator[KeyAdminClient]:
    with kms_server.client("security-officer") as kms:
        yield KeyAdminClient(kms)


@pytest.fixture
def build(kms_server: RunningKms) -> Iterator[KmsClient]:
    with kms_server.client() as kms:
        yield kms


def _verifies(pem: str, digest: bytes, raw: bytes) -> bool:
    public = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    der = utils.encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return False
    return True


def test_every_admin_method_is_for_security_officers_only() -> None:
    for method in SERVICE.methods:
        assert METHOD_ROLES[f"/{SERVICE.full_name}/{method.name}"] == frozenset({Role.SECURITY_OFFICER})


def test_rotate_then_disable_a_digest_signing_key(
    officer: KeyAdminClient, build: KmsClient, kms_server: RunningKms, tmp_path: Path
) -> None:
    key = officer.create_key("officer-demo", "officer-artifacts", "digest-signing", "ecdsa-p256")
    name = key.name
    v1, v2 = f"{name}/versions/1", f"{name}/versions/2"
    old_digest = hashlib.sha256(b"release 1.0").digest()
    old = build.sign_digest(name, old_digest)
    assert old.key_version == v1

    rotated = officer.rotate_key(name)
    assert rotated.key_version == v2 and rotated.key.primary_version == v2

    new_digest = hashlib.sha256(b"release 2.0").digest()
    new = build.sign_digest(name, new_digest)
    assert new.key_version == v2, "the new primary signs at once"
    v1_pem, v2_pem = build.get_public_key(v1).pem, build.get_public_key(v2).pem
    assert v1_pem != v2_pem
    assert _verifies(v1_pem, old_digest, old.signature), "version 1's signatures still verify"
    assert not _verifies(v2_pem, old_digest, old.signature)
    assert _verifies(v2_pem, new_digest, new.signature)
    assert build.sign_digest(v1, new_digest).key_version == v1, "an enabled old version still signs if named"

    disabled = officer.disable_key_version(v1)
    assert disabled.version(v1).state is KeyVersionState.DISABLED
    with pytest.raises(FailedPreconditionError, match="disabled"):
        build.sign_digest(v1, new_digest)  # at once: no wait for the server's key cache
    assert build.sign_digest(name, new_digest).key_version == v2
    assert _verifies(build.get_public_key(v1).pem, old_digest, old.signature), "still verifiable"

    # Destruction needs dual control (tests/e2e/test_dual_control.py): the direct call is refused.
    with pytest.raises(FailedPreconditionError, match="needs dual control"):
        officer.schedule_destruction(v1, delay=timedelta(hours=1))
    with pytest.raises(FailedPreconditionError):
        build.sign_digest(v1, new_digest)

    history = officer.list_transitions(name)
    assert [(t.key_version, t.event, t.actor) for t in history] == [
        (v1, TransitionEvent.CREATED, OFFICER),
        (v1, TransitionEvent.MADE_PRIMARY, OFFICER),
        (v2, TransitionEvent.CREATED, OFFICER),  # the rotation: a new version ...
        (v2, TransitionEvent.MADE_PRIMARY, OFFICER),  # ... that became the primary
        (v1, TransitionEvent.DISABLED, OFFICER),
    ]
    assert (history[4].from_state, history[4].to_state) == (KeyVersionState.ENABLED, KeyVersionState.DISABLED)

    # Each call's audit record names the product, the key and the version acted on, refused calls too.
    exported = tmp_path / "audit.jsonl"
    assert kms_server.kmsctl("audit", "export", "-o", str(exported)).returncode == 0
    records = [json.loads(line) for line in exported.read_text().splitlines()]
    calls = [
        (r["operation"].rsplit("/", 1)[1], r["outcome"], r.get("product"), r.get("key_version"))
        for r in records
        if r["type"] == "record"
        and r.get("resource") == name
        and r["operation"].startswith(f"/{SERVICE.full_name}/")
    ]
    product = key.product
    assert calls == [
        ("CreateKey", "OK", product, v1),
        ("RotateKey", "OK", product, v2),
        ("UpdateKeyVersionState", "OK", product, v1),
        ("ScheduleKeyVersionDestruction", "FAILED_PRECONDITION", product, v1),
        ("ListKeyTransitions", "OK", product, ""),
    ]


@pytest.mark.parametrize("role", ["build-server", "auditor", "factory-registrar", "distribution-server"])
def test_other_roles_get_permission_denied(kms_server: RunningKms, role: str) -> None:
    files = kms_server.credentials(role)
    credentials = grpc.ssl_channel_credentials(
        files["ca"].read_bytes(), files["key"].read_bytes(), files["cert"].read_bytes()
    )
    with grpc.secure_channel(kms_server.target, credentials) as channel:
        stub = admin_pb2_grpc.KeyAdminServiceStub(channel)
        for method in SERVICE.methods:
            creates = method.name in ("CreateKey", "CreateProductKeySet")
            fields = {"product": "artifacts"} if creates else {"name": "keys/artifacts-p256/versions/1"}
            request = getattr(admin_pb2, method.input_type.name)(**fields)
            with pytest.raises(grpc.RpcError) as raised:
                getattr(stub, method.name)(request, timeout=10)
            error = raised.value
            assert isinstance(error, grpc.Call)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method.name
            assert f"role {role}" in (error.details() or "")


def test_kmsctl_as_the_officer(kms_server: RunningKms) -> None:
    create = "keys create --key-id officer-cli --product officer-demo --purpose digest-signing --algorithm"
    created = kms_server.kmsctl(*create.split(), "ecdsa-p384", "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["primary_version"] == "keys/officer-cli/versions/1"

    rotated = kms_server.kmsctl("keys", "rotate", "officer-cli")
    assert rotated.returncode == 0, rotated.stderr
    assert "keys/officer-cli/versions/2 is new and signs new work" in rotated.stdout

    refused = kms_server.kmsctl("keys", "disable", "officer-cli/versions/2")
    assert refused.returncode == 5 and "primary version" in refused.stderr

    denied = kms_server.kmsctl("keys", "rotate", "officer-cli", role="build-server")
    assert denied.returncode == 6 and "may not call" in denied.stderr

    history = kms_server.kmsctl("keys", "history", "officer-cli", "--json")
    assert history.returncode == 0, history.stderr
    events = [
        (t["key_version"][-1], t["event"], t["actor"]) for t in json.loads(history.stdout)["transitions"]
    ]
    assert events == [
        ("1", "created", OFFICER),
        ("1", "made-primary", OFFICER),
        ("2", "created", OFFICER),
        ("2", "made-primary", OFFICER),
    ]

    product_set = kms_server.kmsctl("keys", "create-product-set", "--product", "officer-demo", "--json")
    assert product_set.returncode == 0, product_set.stderr
    assert [k["purpose"] for k in json.loads(product_set.stdout)["created"]] == [
        "ota-manifest",
        "key-encryption",
        "registration-transport",
        "payload-seed",
    ]
