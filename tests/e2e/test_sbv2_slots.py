"""Secure Boot V2 slot revocation against the real server (SoftHSM2, SQLite, gRPC over mTLS, kmsctl).

A product with three ECDSA P-256 keys (ESP32-C6) in slots 0, 1 and 2. Revoking slot 1 takes a request and two
approvals by other officers; once executed, releases carry the blocks of slots 0 and 2 only (checked with
``espsecure verify-signature``, an independent verifier) and nothing is signed with the slot-1 key, not even
by a version rotated in afterwards. Digests are compared with ``espsecure digest-sbv2-public-key``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from kms.domain import sbv2
from kmsapi.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    approvals_pb2,
    approvals_pb2_grpc,
    common_pb2,
    signing_pb2,
    signing_pb2_grpc,
    slots_pb2,
    slots_pb2_grpc,
)
from tests.support.esp_images import build_app_image
from tests.support.espressif_tools import exit_codes, run
from tests.support.kms_server import KeySpec, RunningKms, image_bytes, running_kms
from tests.support.officers import OFFICERS, issue_officers, officer_channel

PRODUCT, PAIR, CLI = "slots", "slots-pair", "slots-cli"
KEYS = [
    *(KeySpec(f"{PRODUCT}-sb{n}", PRODUCT, "ecdsa-p256", n) for n in range(3)),
    *(KeySpec(f"{PAIR}-sb{n}", PAIR, "ecdsa-p256", n) for n in range(2)),
    *(KeySpec(f"{CLI}-sb{n}", CLI, "ecdsa-p256", n) for n in range(3)),
]
ACTIVE = slots_pb2.SECURE_BOOT_SLOT_ACTIVE
REVOKED = slots_pb2.SECURE_BOOT_SLOT_REVOKED


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    with running_kms(tmp_path_factory.mktemp("kms-slots"), KEYS) as running:
        issue_officers(running.state_dir)
        yield running


@pytest.fixture(scope="module")
def officers(server: RunningKms) -> Iterator[dict[str, approvals_pb2_grpc.ApprovalServiceStub]]:
    channels = {name: officer_channel(server, f"security-officer-{name}") for name in OFFICERS}
    yield {name: approvals_pb2_grpc.ApprovalServiceStub(c) for name, c in channels.items()}
    for channel in channels.values():
        channel.close()


def _error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


def _slots(
    server: RunningKms, product: str, identity: str = "security-officer"
) -> list[slots_pb2.SecureBootSlot]:
    with officer_channel(server, identity) as channel:
        response = slots_pb2_grpc.SecureBootSlotServiceStub(channel).ListSecureBootSlots(
            slots_pb2.ListSecureBootSlotsRequest(product=product), timeout=30
        )
    return list(response.slots)


def _pem(server: RunningKms, key: str, tmp: Path) -> Path:
    path = tmp / f"{key}.pem"
    with server.client() as kms:
        path.write_text(kms.get_public_key(f"keys/{key}").pem)
    return path


def _espsecure_digest(pem: Path) -> bytes:
    out = pem.with_suffix(".digest")
    result = run("espsecure", "digest-sbv2-public-key", "--keyfile", str(pem), "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_bytes()


def _sign_digest(server: RunningKms, name: str) -> signing_pb2.SignDigestResponse:
    with officer_channel(server, "build-server") as channel:
        response: signing_pb2.SignDigestResponse = signing_pb2_grpc.SigningServiceStub(channel).SignDigest(
            signing_pb2.SignDigestRequest(name=name, digest=common_pb2.Digest(sha256=bytes(32))), timeout=30
        )
    return response


def _approve(officers: dict[str, approvals_pb2_grpc.ApprovalServiceStub], request_id: str) -> None:
    for name in ("bob", "carol"):
        officers[name].ApproveRequest(approvals_pb2.ApproveRequestRequest(id=request_id), timeout=10)


def _blocks(signed: bytes) -> list[sbv2.ParsedBlock]:
    return sbv2.parse_signature_sector(signed[-sbv2.SECTOR_SIZE :])


def test_three_active_slots_with_the_digests_espsecure_computes(server: RunningKms, tmp_path: Path) -> None:
    slots = _slots(server, PRODUCT)
    assert [(s.product, s.slot, s.state) for s in slots] == [(PRODUCT, n, ACTIVE) for n in range(3)]
    for slot in slots:
        key = f"{PRODUCT}-sb{slot.slot}"
        expected = _espsecure_digest(_pem(server, key, tmp_path))
        assert (slot.key, slot.primary_version) == (f"keys/{key}", f"keys/{key}/versions/1")
        assert slot.algorithm == common_pb2.ECDSA_P256_SHA256
        assert slot.efuse_digest == expected
        assert [(v.name, v.state, v.efuse_digest, v.primary) for v in slot.versions] == [
            (f"keys/{key}/versions/1", common_pb2.ENABLED, expected, True)
        ]
        assert not slot.revoked_by and not slot.revocation_request and not slot.HasField("revoke_time")
    assert [s.efuse_digest for s in _slots(server, PRODUCT, "auditor")] == [s.efuse_digest for s in slots]
    code, _ = _error(lambda: _slots(server, PRODUCT, "build-server"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = _error(lambda: _slots(server, "no-such-product"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_revoking_slot_1_under_dual_control(
    server: RunningKms, officers: dict[str, approvals_pb2_grpc.ApprovalServiceStub], tmp_path: Path
) -> None:
    alice, bob = officers["alice"], officers["bob"]
    image = build_app_image("esp32c6", 20_000, secure_version=1, seed=31)
    with server.client() as kms:
        before = kms.sign_image(PRODUCT, image)
    assert len(_blocks(image_bytes(before))) == 3
    assert _sign_digest(server, f"keys/{PRODUCT}-sb1").key_version == f"keys/{PRODUCT}-sb1/versions/1"

    made = alice.RequestSlotRevocation(
        approvals_pb2.RequestSlotRevocationRequest(product=PRODUCT, slot=1), timeout=10
    )
    assert made.action == approvals_pb2.APPROVAL_ACTION_REVOKE_SBV2_SLOT
    assert made.state == approvals_pb2.APPROVAL_STATE_PENDING and made.required_approvals == 2
    assert made.target == f"products/{PRODUCT}/sbv2-slots/1"
    assert dict(made.parameters) == {
        "product": PRODUCT,
        "key": f"keys/{PRODUCT}-sb1",
        "primary_version": f"keys/{PRODUCT}-sb1/versions/1",
    }
    code, details = _error(lambda: alice.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "cannot vote" in details
    bob.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id), timeout=10)
    code, details = _error(lambda: bob.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=made.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "1 more approval" in details
    assert [s.state for s in _slots(server, PRODUCT)] == [ACTIVE, ACTIVE, ACTIVE]  # nothing happened yet

    officers["carol"].ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id), timeout=10)
    done = alice.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=made.id), timeout=30)
    assert done.request.state == approvals_pb2.APPROVAL_STATE_EXECUTED
    alice_id = "spiffe://kms.dev/security-officer/alice"
    assert (done.slot.slot, done.slot.state, done.slot.revoked_by) == (1, REVOKED, alice_id)
    assert done.slot.revocation_request == f"approvals/{made.id}"

    slots = _slots(server, PRODUCT)
    assert [s.state for s in slots] == [ACTIVE, REVOKED, ACTIVE]
    assert (slots[1].revoked_by, slots[1].revocation_request) == (alice_id, f"approvals/{made.id}")
    assert slots[1].revoke_time.seconds == done.request.execute_time.seconds
    assert slots[1].key == f"keys/{PRODUCT}-sb1"  # the key stays in its slot, for the record

    # The same input is signed anew (the stored 3-block release names the revoked key's version).
    with server.client() as kms:
        after = kms.sign_image(PRODUCT, image)
    assert not after.release.reused and after.release.name != before.release.name
    assert after.release.key_versions == (f"keys/{PRODUCT}-sb0/versions/1", f"keys/{PRODUCT}-sb2/versions/1")
    signed = image_bytes(after)
    assert [b.key_digest for b in _blocks(signed)] == [slots[0].efuse_digest, slots[2].efuse_digest]
    path = tmp_path / "signed.bin"
    path.write_bytes(signed)
    keys = [_pem(server, f"{PRODUCT}-sb{n}", tmp_path) for n in range(3)]
    verdicts = exit_codes(
        "espsecure", [["verify-signature", "--version", "2", "--keyfile", str(k), str(path)] for k in keys]
    )
    assert [code == 0 for code in verdicts] == [True, False, True]

    for name in (f"keys/{PRODUCT}-sb1", f"keys/{PRODUCT}-sb1/versions/1"):
        code, details = _error(lambda name=name: _sign_digest(server, name))  # type: ignore[misc]
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "revoked" in details
    assert _sign_digest(server, f"keys/{PRODUCT}-sb0").key_version == f"keys/{PRODUCT}-sb0/versions/1"

    # A version rotated into the revoked key signs nothing either.
    with officer_channel(server, "security-officer") as channel:
        rotated = admin_pb2_grpc.KeyAdminServiceStub(channel).RotateKey(
            admin_pb2.RotateKeyRequest(name=f"keys/{PRODUCT}-sb1"), timeout=30
        )
    assert rotated.key_version.name == f"keys/{PRODUCT}-sb1/versions/2"
    code, _ = _error(lambda: _sign_digest(server, f"keys/{PRODUCT}-sb1"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    with server.client() as kms:
        fresh = kms.sign_image(PRODUCT, build_app_image("esp32c6", 20_000, secure_version=1, seed=32))
    assert len(fresh.release.key_versions) == 2 and len(_blocks(image_bytes(fresh))) == 2
    assert _slots(server, PRODUCT)[1].primary_version == f"keys/{PRODUCT}-sb1/versions/2"

    again = approvals_pb2.RequestSlotRevocationRequest(product=PRODUCT, slot=1)
    code, details = _error(lambda: bob.RequestSlotRevocation(again))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "revoked already" in details
    code, details = _error(lambda: bob.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=made.id)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "executed" in details
    for bad in (
        approvals_pb2.RequestSlotRevocationRequest(product=PRODUCT, slot=3),
        approvals_pb2.RequestSlotRevocationRequest(product="Not A Product", slot=0),
    ):
        code, _ = _error(lambda bad=bad: bob.RequestSlotRevocation(bad))  # type: ignore[misc]
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_last_active_slot_cannot_be_revoked(
    server: RunningKms, officers: dict[str, approvals_pb2_grpc.ApprovalServiceStub]
) -> None:
    """Both requests pass the check when made; the second is refused when executed, after the first, and
    stays APPROVED (nothing was revoked); a new request for it is refused up front."""
    alice = officers["alice"]
    ids = [
        alice.RequestSlotRevocation(
            approvals_pb2.RequestSlotRevocationRequest(product=PAIR, slot=n), timeout=10
        ).id
        for n in (0, 1)
    ]
    for request_id in ids:
        _approve(officers, request_id)
    alice.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=ids[0]), timeout=30)
    code, details = _error(lambda: alice.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=ids[1])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "last active slot" in details
    listed = alice.ListApprovalRequests(
        approvals_pb2.ListApprovalRequestsRequest(state=approvals_pb2.APPROVAL_STATE_APPROVED), timeout=10
    )
    assert ids[1] in [r.id for r in listed.requests]
    assert [s.state for s in _slots(server, PAIR)] == [REVOKED, ACTIVE, slots_pb2.SECURE_BOOT_SLOT_EMPTY]
    code, details = _error(
        lambda: alice.RequestSlotRevocation(approvals_pb2.RequestSlotRevocationRequest(product=PAIR, slot=1))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "last active slot" in details
    code, details = _error(
        lambda: alice.RequestSlotRevocation(approvals_pb2.RequestSlotRevocationRequest(product=PAIR, slot=2))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "empty" in details


def test_kmsctl_slots_show_export_revoke(server: RunningKms, tmp_path: Path) -> None:
    shown = server.kmsctl("slots", "show", "--product", CLI, "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert [(s["slot"], s["state"], s["algorithm"]) for s in data["slots"]] == [
        (n, "active", "ecdsa-p256") for n in range(3)
    ]
    expected = [_espsecure_digest(_pem(server, f"{CLI}-sb{n}", tmp_path)) for n in range(3)]
    assert [bytes.fromhex(s["efuse_digest"]) for s in data["slots"]] == expected
    table = server.kmsctl("slots", "show", "--product", CLI)
    assert table.returncode == 0, table.stderr
    rows = table.stdout.splitlines()
    assert rows[0].split()[:4] == ["SLOT", "STATE", "KEY", "VERSION"]
    assert rows[2].split() == ["1", "active", f"keys/{CLI}-sb1/versions/1", "ecdsa-p256", expected[1].hex()]

    out = tmp_path / "digests"
    exported = server.kmsctl("slots", "export", "--product", CLI, "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in out.iterdir()) == ["slot0.digest", "slot1.digest", "slot2.digest"]
    assert [(out / f"slot{n}.digest").read_bytes() for n in range(3)] == expected
    assert f"burn-key BLOCK_KEY0 {out / 'slot0.digest'} SECURE_BOOT_DIGEST0" in exported.stdout

    asked = server.kmsctl("slots", "revoke", "--product", CLI, "--slot", "1", role="security-officer-alice")
    assert asked.returncode == 0, asked.stderr
    found = re.search(r"approval request ([0-9a-f]{16}), pending", asked.stdout)
    assert found is not None, asked.stdout
    request_id = found.group(1)
    assert f"kmsctl approvals approve {request_id}" in asked.stdout
    assert f"kmsctl approvals execute {request_id}" in asked.stdout
    for name in ("bob", "carol"):
        voted = server.kmsctl("approvals", "approve", request_id, role=f"security-officer-{name}")
        assert voted.returncode == 0, voted.stderr
    executed = server.kmsctl("approvals", "execute", request_id, "--json")
    assert executed.returncode == 0, executed.stderr
    result = json.loads(executed.stdout)
    assert result["request"]["state"] == "executed"
    assert (result["slot"]["slot"], result["slot"]["state"]) == (1, "revoked")
    assert result["slot"]["revocation_request"] == f"approvals/{request_id}"
    assert result["slot"]["revoked_by"] == "spiffe://kms.dev/security-officer/dev"

    out.joinpath("slot1.digest").unlink()
    again = server.kmsctl("slots", "export", "--product", CLI, "-o", str(out), "--json")
    assert again.returncode == 0, again.stderr
    assert [d["slot"] for d in json.loads(again.stdout)["digests"]] == [0, 2]
    assert sorted(p.name for p in out.iterdir()) == ["slot0.digest", "slot2.digest"]
    shown = server.kmsctl("slots", "show", "--product", CLI)
    assert shown.stdout.splitlines()[2].split()[:2] == ["1", "revoked"]
    refused = server.kmsctl("slots", "revoke", "--product", CLI, "--slot", "1")
    assert refused.returncode == 5 and "revoked already" in refused.stderr
