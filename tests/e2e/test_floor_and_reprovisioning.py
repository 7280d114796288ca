"""Lowering an anti-rollback floor and re-provisioning a device's secret under dual control, against the
real server (SoftHSM2, SQLite, gRPC over mTLS), with the officers alice, bob and carol of
``tests.support.officers``.

Payloads after re-provisioning are checked by the Python device model: the one holding the new secret
installs them, the one holding the old secret rejects them. A second factory station (``LINE_2``, a
certificate issued here) re-provisions, so the device shows who installed its current secret apart from its
first registrar, and the audit record of that RegisterDevices call names the device.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from kms.domain.identity import Role
from kms.server.pki import issue_dev_client
from kmsapi.v1 import (
    approvals_pb2,
    approvals_pb2_grpc,
    devices_pb2,
    devices_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
    rollback_pb2,
    rollback_pb2_grpc,
)
from kmsctl import errors
from kmsctl.device import DeviceModel, Verdict
from tests.support.esp_images import build_app_image
from tests.support.kms_server import KeySpec, RunningKms, init_state, running_kms
from tests.support.officers import OFFICERS, issue_officers, officer_channel

CHIP, CHIP_ID = "esp32c6", 0x000D
FLEET = "reprov"  # a product with the factory and distribution keys
FLOOR_PRODUCTS = ("floor-a", "floor-b", "floor-c", "floor-d")
KEYS = [KeySpec(f"{product}-sbv2-0", product, "ecdsa-p256", 0) for product in (*FLOOR_PRODUCTS, FLEET)]
Outcome = devices_pb2.RowOutcome
Officers = dict[str, approvals_pb2_grpc.ApprovalServiceStub]
REGISTRAR = "spiffe://kms.dev/factory-registrar/dev"  # the dev PKI's factory station
LINE_2 = "factory-registrar-line-2"  # another station's certificate files
LINE_2_IDENTITY = "spiffe://kms.dev/factory-registrar/line-2"
REGISTER_DEVICES = "/kmsapi.v1.DeviceRegistryService/RegisterDevices"


def _issue_line_2(state: Path) -> None:
    """A client certificate for a second factory station, issued by the dev CA."""
    assert issue_dev_client(state / "pki", Role.FACTORY_REGISTRAR, "line-2") == LINE_2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    state = tmp_path_factory.mktemp("kms-floor-reprovision")
    init_state(state, KEYS, [FLEET])
    issue_officers(state)
    _issue_line_2(state)
    with running_kms(state, KEYS, init=False) as running:
        yield running


@pytest.fixture(scope="module")
def officers(server: RunningKms) -> Iterator[Officers]:
    channels = {name: officer_channel(server, f"security-officer-{name}") for name in OFFICERS}
    yield {name: approvals_pb2_grpc.ApprovalServiceStub(c) for name, c in channels.items()}
    for channel in channels.values():
        channel.close()


def _refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error = raised.value
    assert isinstance(error, grpc.Call)
    return error.code(), error.details() or ""


def _approved_by_bob_and_carol(officers: Officers, request_id: str) -> None:
    for name in ("bob", "carol"):
        officers[name].ApproveRequest(approvals_pb2.ApproveRequestRequest(id=request_id), timeout=10)


def _execute(
    officers: Officers, request_id: str, name: str = "alice"
) -> approvals_pb2.ExecuteRequestResponse:
    response: approvals_pb2.ExecuteRequestResponse = officers[name].ExecuteRequest(
        approvals_pb2.ExecuteRequestRequest(id=request_id), timeout=30
    )
    return response


# -- the anti-rollback floor -----------------------------------------------------------------------------


def _sign(server: RunningKms, product: str, secure_version: int) -> bytes:
    image = build_app_image(CHIP, 20_000, secure_version=secure_version, seed=secure_version)
    with server.client() as kms:
        signed = kms.sign_image(product, image)
    assert signed.release.secure_version == secure_version and signed.data is not None
    return signed.data


def _floor(server: RunningKms, product: str, role: str = "auditor") -> rollback_pb2.RollbackFloor:
    with officer_channel(server, role) as channel:
        floor: rollback_pb2.RollbackFloor = rollback_pb2_grpc.RollbackFloorServiceStub(
            channel
        ).GetRollbackFloor(rollback_pb2.GetRollbackFloorRequest(product=product), timeout=10)
    return floor


def _request_lowering(officers: Officers, product: str, to: int) -> approvals_pb2.ApprovalRequest:
    request: approvals_pb2.ApprovalRequest = officers["alice"].RequestFloorLowering(
        approvals_pb2.RequestFloorLoweringRequest(product=product, secure_version=to), timeout=10
    )
    return request


def test_two_other_officers_lower_the_floor_and_older_releases_sign_again(
    server: RunningKms, officers: Officers
) -> None:
    product = "floor-a"
    _sign(server, product, 5)
    before = _floor(server, product)
    assert before.secure_version == 5 and not before.HasField("update_time") and not before.update_request
    with pytest.raises(errors.FailedPreconditionError, match="anti-rollback"):
        _sign(server, product, 3)

    made = _request_lowering(officers, product, 2)
    assert made.action == approvals_pb2.APPROVAL_ACTION_LOWER_ROLLBACK_FLOOR
    assert made.target == "products/floor-a/rollback-floor"
    assert dict(made.parameters) == {"product": product, "secure_version": "2", "current_floor": "5"}
    code, details = _refused(
        lambda: officers["alice"].ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id))
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "cannot vote" in details
    officers["bob"].ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id), timeout=10)
    code, details = _refused(lambda: _execute(officers, made.id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "1 more approval" in details
    assert _floor(server, product).secure_version == 5  # nothing lowered before M approvals
    officers["carol"].ApproveRequest(approvals_pb2.ApproveRequestRequest(id=made.id), timeout=10)

    done = _execute(officers, made.id)

    assert done.request.state == approvals_pb2.APPROVAL_STATE_EXECUTED
    assert done.floor.secure_version == 2
    assert done.floor.updated_by == "spiffe://kms.dev/security-officer/alice"
    assert done.floor.update_request == f"approvals/{made.id}"
    shown = _floor(server, product, role="build-server")
    assert shown == done.floor
    assert abs(shown.update_time.seconds - done.request.execute_time.seconds) <= 5
    _sign(server, product, 3)  # below the old floor: signed now
    assert _floor(server, product).secure_version == 3  # and the floor rises again by itself
    with pytest.raises(errors.FailedPreconditionError, match="floor 3"):
        _sign(server, product, 2)

    exported = server.state_dir / f"audit-{made.id}.jsonl"
    assert server.kmsctl("audit", "export", "-o", str(exported)).returncode == 0
    records = [json.loads(line) for line in exported.read_text().splitlines() if line.strip()]
    trail = [
        (r["caller"].rsplit("/", 1)[1], r["operation"].rsplit("/", 1)[1], r["outcome"], r.get("product"))
        for r in records
        if r.get("resource") == f"approvals/{made.id}"
    ]
    assert [entry[:3] for entry in trail] == [
        ("alice", "RequestFloorLowering", "OK"),
        ("alice", "ApproveRequest", "PERMISSION_DENIED"),
        ("bob", "ApproveRequest", "OK"),
        ("alice", "ExecuteRequest", "FAILED_PRECONDITION"),
        ("carol", "ApproveRequest", "OK"),
        ("alice", "ExecuteRequest", "OK"),
    ]
    assert trail[0][3] == trail[-1][3] == product


def test_a_lowering_is_refused_when_the_floor_moved_after_the_request(
    server: RunningKms, officers: Officers
) -> None:
    product = "floor-b"
    _sign(server, product, 5)
    made = _request_lowering(officers, product, 2)
    _approved_by_bob_and_carol(officers, made.id)
    _sign(server, product, 7)  # a release signed after the officers decided

    code, details = _refused(lambda: _execute(officers, made.id))

    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "is now at 7, not at 5 as when the lowering was requested" in details
    assert _floor(server, product).secure_version == 7
    assert not _floor(server, product).update_request


def test_a_lowering_must_go_below_an_existing_floor(server: RunningKms, officers: Officers) -> None:
    product = "floor-c"
    code, details = _refused(lambda: _request_lowering(officers, product, 0))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "nothing was signed for it yet" in details
    assert not _floor(server, product).HasField("secure_version")
    _sign(server, product, 4)
    for not_lower in (4, 6):
        code, details = _refused(lambda: _request_lowering(officers, product, not_lower))  # noqa: B023
        assert (
            code == grpc.StatusCode.INVALID_ARGUMENT and "must be below" in details and "floor 4" in details
        )
    with officer_channel(server, "build-server") as channel:
        stub = approvals_pb2_grpc.ApprovalServiceStub(channel)
        code, _ = _refused(
            lambda: stub.RequestFloorLowering(
                approvals_pb2.RequestFloorLoweringRequest(product=product, secure_version=1)
            )
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_product_without_keys_has_no_floor(server: RunningKms) -> None:
    """Not an empty floor ("nothing signed yet") for a misspelt product: NOT_FOUND, as for its slots."""
    code, details = _refused(lambda: _floor(server, "floor-z"))
    assert code == grpc.StatusCode.NOT_FOUND and "product 'floor-z' has no keys" in details
    assert _floor(server, "floor-c").product == "floor-c"  # a product with keys reads fine, signed or not


def test_kmsctl_floor_show_and_lower(server: RunningKms, officers: Officers) -> None:
    product = "floor-d"
    _sign(server, product, 6)
    shown = server.kmsctl("floor", "show", "--product", product, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {
        "product": product,
        "secure_version": 6,
        "update_time": None,
        "updated_by": None,
        "update_request": None,
    }

    asked = server.kmsctl("floor", "lower", "--product", product, "--to", "1", role="security-officer-alice")
    assert asked.returncode == 0, asked.stderr
    found = re.search(r"approval request ([0-9a-f]+) \(pending", asked.stdout)
    assert found is not None, asked.stdout
    request_id = found.group(1)
    assert "from 6 to 1" in asked.stdout
    assert f"kmsctl approvals approve {request_id}" in asked.stdout
    assert f"kmsctl approvals execute {request_id}" in asked.stdout
    too_high = server.kmsctl(
        "floor", "lower", "--product", product, "--to", "6", role="security-officer-alice"
    )
    assert too_high.returncode == 3 and "must be below" in too_high.stderr

    for name in ("bob", "carol"):
        voted = server.kmsctl("approvals", "approve", request_id, role=f"security-officer-{name}")
        assert voted.returncode == 0, voted.stderr
    executed = server.kmsctl("approvals", "execute", request_id, "--json", role="security-officer-bob")
    assert executed.returncode == 0, executed.stderr
    assert json.loads(executed.stdout)["floor"]["secure_version"] == 1
    lowered = json.loads(server.kmsctl("floor", "show", "--product", product, "--json").stdout)
    assert lowered["secure_version"] == 1 and lowered["update_request"] == f"approvals/{request_id}"
    assert lowered["updated_by"] == "spiffe://kms.dev/security-officer/bob" and lowered["update_time"]
    text = server.kmsctl("floor", "show", "--product", product, role="auditor")
    assert text.returncode == 0 and "secure_version 1" in text.stdout and request_id in text.stdout


# -- device re-provisioning ------------------------------------------------------------------------------


def _register(
    server: RunningKms,
    device_id: str,
    secret: bytes,
    *,
    chip: str = CHIP,
    wrapped: bool = True,
    station: str = "factory-registrar",
) -> devices_pb2.RowOutcome:
    """Register one device as a factory station does; ``wrapped``: through the registration key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    with officer_channel(server, station) as channel:
        stub = devices_pb2_grpc.DeviceRegistryServiceStub(channel)
        header = devices_pb2.RegisterDevicesHeader(product=FLEET)
        if wrapped:
            key = stub.GetRegistrationKey(devices_pb2.GetRegistrationKeyRequest(product=FLEET), timeout=30)
            public = serialization.load_pem_public_key(key.pem.encode())
            assert isinstance(public, rsa.RSAPublicKey)
            batch_key = os.urandom(32)
            oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)  # noqa: S303
            header.transport_key_version = key.key_version
            header.wrapped_batch_key = public.encrypt(batch_key, oaep)
            secret = aes_key_wrap(batch_key, secret)
        row = devices_pb2.DeviceRow(row=1, device_id=device_id, chip=chip, secret=secret)

        def requests() -> Iterator[devices_pb2.RegisterDevicesRequest]:
            yield devices_pb2.RegisterDevicesRequest(header=header)
            yield devices_pb2.RegisterDevicesRequest(devices=devices_pb2.DeviceRows(rows=[row]))

        (response,) = list(stub.RegisterDevices(requests(), timeout=60))
    (outcome,) = response.outcomes
    return outcome


def _device_info(server: RunningKms, device_id: str) -> devices_pb2.DeviceInfo:
    with officer_channel(server, "auditor") as channel:
        info: devices_pb2.DeviceInfo = devices_pb2_grpc.DeviceRegistryServiceStub(channel).GetDevice(
            devices_pb2.GetDeviceRequest(device_id=device_id), timeout=10
        )
    return info


def _payload(server: RunningKms, device_id: str, release: str) -> bytes:
    with officer_channel(server, "distribution-server") as channel:
        stub = devices_pb2_grpc.DistributionServiceStub(channel)
        responses = list(
            stub.GetPayload(devices_pb2.GetPayloadRequest(device_id=device_id, release=release), timeout=60)
        )
    return b"".join(r.chunk for r in responses[1:])


def _device_model(server: RunningKms, device_id: str, secret: bytes) -> DeviceModel:
    with officer_channel(server, "auditor") as channel:
        pem = (
            keys_pb2_grpc.KeyServiceStub(channel)
            .GetPublicKey(keys_pb2.GetPublicKeyRequest(name=f"keys/{FLEET}-manifest"), timeout=30)
            .pem
        )
    der = serialization.load_pem_public_key(pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DeviceModel(
        efuse_secret=secret,
        device_id=device_id.encode(),
        chip_id=CHIP_ID,
        manifest_keys_der=[der],
        floor=0,
        slot_size=1 << 16,
    )


def _registrations(server: RunningKms, count: int) -> list[dict[str, str]]:
    """The audit records of the last ``count`` RegisterDevices calls, oldest first."""
    tail = server.kmsctl("audit", "tail", "-n", "200", "--json")
    assert tail.returncode == 0, tail.stderr
    records: list[dict[str, str]] = json.loads(tail.stdout)["records"]
    return [r for r in records if r["operation"] == REGISTER_DEVICES][-count:]


def _request_reprovisioning(
    officers: Officers, device_id: str, reason: str = "mainboard replaced"
) -> approvals_pb2.ApprovalRequest:
    request: approvals_pb2.ApprovalRequest = officers["alice"].RequestDeviceReprovisioning(
        approvals_pb2.RequestDeviceReprovisioningRequest(device_id=device_id, reason=reason), timeout=10
    )
    return request


def test_an_approved_reprovisioning_admits_one_new_secret(server: RunningKms, officers: Officers) -> None:
    device_id = "24:6f:28:0e:00:01"
    s1, s2, s3 = os.urandom(32), os.urandom(32), os.urandom(32)
    assert _register(server, device_id, s1).status == Outcome.CREATED
    refused = _register(server, device_id, s2)
    assert refused.status == Outcome.REJECTED and refused.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    with server.client() as kms:
        release = kms.sign_image(FLEET, build_app_image(CHIP, 20_000, secure_version=3, seed=31)).release.name
    before = _payload(server, device_id, release)
    assert _device_model(server, device_id, s1).apply_update(before).verdict is Verdict.OK

    code, details = _refused(lambda: _request_reprovisioning(officers, device_id, reason="  "))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs a reason" in details
    made = _request_reprovisioning(officers, device_id)
    assert made.action == approvals_pb2.APPROVAL_ACTION_REPROVISION_DEVICE_SECRET
    assert made.target == f"devices/{device_id}"
    assert dict(made.parameters) == {"reason": "mainboard replaced", "product": FLEET}
    assert not _device_info(server, device_id).HasField("reprovision_until")  # nothing open before execution
    _approved_by_bob_and_carol(officers, made.id)

    done = _execute(officers, made.id)

    assert done.device.device_id == device_id and done.device.secret_generation == 1
    assert done.device.reprovision_until == made.expire_time
    first = done.device  # generation 1: the current secret is the first registrar's
    assert (first.registered_by, first.secret_registered_by) == (REGISTRAR, REGISTRAR)
    assert first.secret_register_time == first.register_time and first.reprovisioned_under == ""
    assert _register(server, device_id, s1, wrapped=False).status == Outcome.UNCHANGED  # same secret
    wrong_chip = _register(server, device_id, s2, chip="esp32s3")
    assert wrong_chip.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "registered as an esp32c6, not an esp32s3" in wrong_chip.message
    assert _device_info(server, device_id).reprovision_until == made.expire_time  # still open

    started = time.time()
    assert _register(server, device_id, s2, station=LINE_2).status == Outcome.REPROVISIONED

    info = _device_info(server, device_id)
    assert info.secret_generation == 2 and not info.HasField("reprovision_until")
    assert (info.registered_by, info.register_time) == (REGISTRAR, first.register_time)  # the first one
    assert info.secret_registered_by == LINE_2_IDENTITY
    assert started - 1 <= info.secret_register_time.ToNanoseconds() / 1e9 <= time.time() + 1
    assert info.reprovisioned_under == f"approvals/{made.id}"
    rejected, replaced = _registrations(server, 2)  # the wrong chip's call, then the re-provisioning
    assert (rejected["caller"], rejected["resource"], rejected["outcome"]) == (REGISTRAR, "", "OK")
    assert (replaced["caller"], replaced["product"], replaced["outcome"]) == (LINE_2_IDENTITY, FLEET, "OK")
    assert replaced["resource"] == f"devices/{device_id}"
    again = _register(server, device_id, s3, wrapped=False)
    assert again.status == Outcome.REJECTED and again.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    after = _payload(server, device_id, release)
    assert after != before
    assert _device_model(server, device_id, s1).apply_update(after).verdict is Verdict.BAD_SEGMENT
    installed = _device_model(server, device_id, s2).apply_update(after)
    assert installed.verdict is Verdict.OK, installed.detail
    assert _payload(server, device_id, release) == after  # still deterministic, now for the new secret


def test_one_stream_reprovisioning_several_devices_names_the_first_and_a_count(
    server: RunningKms, officers: Officers
) -> None:
    opened = ["24:6f:28:0e:00:11", "24:6f:28:0e:00:12", "24:6f:28:0e:00:13"]
    new = "24:6f:28:0e:00:14"
    for device_id in opened:
        assert _register(server, device_id, os.urandom(32), wrapped=False).status == Outcome.CREATED
        made = _request_reprovisioning(officers, device_id)
        _approved_by_bob_and_carol(officers, made.id)
        _execute(officers, made.id)
    # Two acknowledged messages: the note covers the devices of both, whatever else the stream held.
    batches = [[opened[0], new], [opened[1], opened[2]]]

    def requests() -> Iterator[devices_pb2.RegisterDevicesRequest]:
        yield devices_pb2.RegisterDevicesRequest(header=devices_pb2.RegisterDevicesHeader(product=FLEET))
        for batch in batches:
            rows = [
                devices_pb2.DeviceRow(row=n, device_id=d, chip=CHIP, secret=os.urandom(32))
                for n, d in enumerate(batch, 1)
            ]
            yield devices_pb2.RegisterDevicesRequest(devices=devices_pb2.DeviceRows(rows=rows))

    with officer_channel(server, LINE_2) as channel:
        responses = list(devices_pb2_grpc.DeviceRegistryServiceStub(channel).RegisterDevices(requests()))
    assert [[o.status for o in r.outcomes] for r in responses] == [
        [Outcome.REPROVISIONED, Outcome.CREATED],
        [Outcome.REPROVISIONED, Outcome.REPROVISIONED],
    ]
    (record,) = _registrations(server, 1)
    assert record["resource"] == f"devices/{opened[0]} (+2 re-provisioned)"
    created = _device_info(server, new)  # a new device's first secret is its registrar's
    assert (created.secret_generation, created.reprovisioned_under) == (1, "")
    assert created.registered_by == created.secret_registered_by == LINE_2_IDENTITY


def test_a_revoked_device_is_not_reprovisioned(server: RunningKms, officers: Officers) -> None:
    device_id = "24:6f:28:0e:00:02"
    assert _register(server, device_id, os.urandom(32), wrapped=False).status == Outcome.CREATED
    made = _request_reprovisioning(officers, device_id)
    _approved_by_bob_and_carol(officers, made.id)
    with officer_channel(server, "security-officer") as channel:
        devices_pb2_grpc.DeviceRegistryServiceStub(channel).RevokeDevice(
            devices_pb2.RevokeDeviceRequest(device_id=device_id), timeout=10
        )
    code, details = _refused(lambda: _execute(officers, made.id))
    assert (
        code == grpc.StatusCode.FAILED_PRECONDITION and "a revoked device cannot be re-provisioned" in details
    )
    code, _ = _refused(lambda: _request_reprovisioning(officers, device_id))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = _refused(lambda: _request_reprovisioning(officers, "24:6f:28:0e:00:ff"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_kmsctl_devices_reprovision_register_and_show(
    server: RunningKms, officers: Officers, tmp_path: Path
) -> None:
    device_id = "24:6f:28:0e:00:03"
    assert _register(server, device_id, os.urandom(32)).status == Outcome.CREATED
    asked = server.kmsctl(
        "devices", "reprovision", device_id, "--reason", "new key block burned", role="security-officer-alice"
    )
    assert asked.returncode == 0, asked.stderr
    found = re.search(r"approval request ([0-9a-f]+) \(pending", asked.stdout)
    assert found is not None and f"kmsctl approvals approve {found.group(1)}" in asked.stdout
    request_id = found.group(1)
    _approved_by_bob_and_carol(officers, request_id)
    executed = server.kmsctl("approvals", "execute", request_id)
    assert executed.returncode == 0, executed.stderr
    assert f"device {device_id} is open for re-provisioning until" in executed.stdout
    shown = server.kmsctl("devices", "show", device_id, "--json")
    assert shown.returncode == 0, shown.stderr
    opened = json.loads(shown.stdout)
    assert opened["secret_generation"] == 1 and opened["reprovision_until"]

    csv = tmp_path / "repaired.csv"
    csv.write_text(f"device_id,chip,secret\n{device_id},{CHIP},{os.urandom(32).hex()}\n")
    registered = server.kmsctl("devices", "register", "--product", FLEET, "--csv", str(csv), "--json")
    assert registered.returncode == 0, registered.stderr
    counts = json.loads(registered.stdout)
    assert (counts["reprovisioned"], counts["created"], counts["rejected_count"]) == (1, 0, 0)
    text = server.kmsctl("devices", "show", device_id)
    assert text.returncode == 0 and "generation      2" in text.stdout and "reprovision by" not in text.stdout


@pytest.fixture(scope="module")
def short_ttl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKms]:
    state = tmp_path_factory.mktemp("kms-reprovision-ttl")
    init_state(state, [], [FLEET])
    with (state / "kms.toml").open("a") as config:
        config.write("\n[dual_control]\nrequired_approvals = 1\nttl_seconds = 3\n")
    issue_officers(state)
    with running_kms(state, init=False) as running:
        yield running


def test_expired_requests_and_windows_admit_nothing(short_ttl_server: RunningKms) -> None:
    server = short_ttl_server
    device_id, other_id = "24:6f:28:0e:01:01", "24:6f:28:0e:01:02"
    for new in (device_id, other_id):
        assert _register(server, new, os.urandom(32), wrapped=False).status == Outcome.CREATED
    with (
        officer_channel(server, "security-officer-alice") as a,
        officer_channel(server, "security-officer-bob") as b,
    ):
        alice, bob = approvals_pb2_grpc.ApprovalServiceStub(a), approvals_pb2_grpc.ApprovalServiceStub(b)
        reason = approvals_pb2.RequestDeviceReprovisioningRequest(device_id=device_id, reason="repair")
        late = alice.RequestDeviceReprovisioning(
            approvals_pb2.RequestDeviceReprovisioningRequest(device_id=other_id, reason="repair"), timeout=10
        )
        prompt = alice.RequestDeviceReprovisioning(reason, timeout=10)
        for request in (late, prompt):
            bob.ApproveRequest(approvals_pb2.ApproveRequestRequest(id=request.id), timeout=10)
        opened = bob.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=prompt.id), timeout=10)
        assert opened.device.reprovision_until == prompt.expire_time
        time.sleep(max(0.0, prompt.expire_time.ToNanoseconds() / 1e9 - time.time()) + 0.5)

        code, details = _refused(lambda: bob.ExecuteRequest(approvals_pb2.ExecuteRequestRequest(id=late.id)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "expired" in details

    closed = _register(server, device_id, os.urandom(32), wrapped=False)
    assert closed.status == Outcome.REJECTED and closed.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    info = _device_info(server, device_id)
    assert info.secret_generation == 1 and not info.HasField("reprovision_until")
